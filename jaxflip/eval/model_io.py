"""What every eval command starts from: the model of ``--checkpoint``, its tokenizer, and the
bitflip rules of ``--bitflip-config`` applied to it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import jax

from jaxflip.bitflip import RuleTable, apply_bitflip_rules, match_rules, named_linears
from jaxflip.bitflip.rules_file import load_bitflip_config
from jaxflip.data import load_tokenizer
from jaxflip.models import LlamaForCausalLM, open_checkpoint
from jaxflip.models.sharding import make_mesh


def open_model(checkpoint: str, *, dtype: str | None = None, shard: bool = True) -> tuple[LlamaForCausalLM, str | None]:
    """``(model, tokenizer_dir or None)`` of a jaxflip checkpoint or an HF model directory;
    on several devices (and ``shard``) its weights are FSDP-sharded over all of them (forwards then run
    under ``on_model_mesh``: batch rows split over the devices when they divide, each
    device flipping its own shards)."""
    mesh = make_mesh() if shard and jax.device_count() > 1 else None
    return open_checkpoint(checkpoint, mesh=mesh, param_dtype=dtype)


def open_tokenizer(tokenizer: str | None, checkpoint_tokenizer_dir: str | None, checkpoint: str):
    """``--tokenizer`` if given (a path, a hub name or ``builtin``), else the checkpoint's own."""
    source = tokenizer or checkpoint_tokenizer_dir
    if source is None:
        raise ValueError(f"{checkpoint} has no tokenizer; pass --tokenizer (a path, a hub name or 'builtin')")
    return load_tokenizer(source)


@dataclass(frozen=True)
class BitflipSetup:
    """The rules of a bitflip config file as applied to one model."""

    path: str
    rules: dict
    seed_mode: str
    base_seed: int
    table: RuleTable

    def summary(self) -> dict:
        """The JSON record of what was flipped."""
        return {"config": self.path, "seed_mode": self.seed_mode, "base_seed": self.base_seed,
                "flipped_layers": [row.layer for row in self.table if row.flipped]}


def resolve_bitflip_config(model: LlamaForCausalLM, path: str) -> BitflipSetup:
    """The file's rules matched to ``model``'s layers and checked; nothing is configured yet
    (a command that runs clean first checks its rules with this before the clean pass)."""
    layer_names = list(named_linears(model))
    rules, seed_mode, base_seed = load_bitflip_config(path, layer_names=layer_names)
    table = match_rules(layer_names, rules, seed_mode, base_seed)
    if not any(row.flipped for row in table):
        raise ValueError(f"{path}: the bitflip rules flip no layer of this model")
    return BitflipSetup(path, rules, seed_mode, base_seed, table)


def apply_bitflip_config(model: LlamaForCausalLM, path: str) -> BitflipSetup:
    """Configure ``model``'s flips from the file (its seeds start afresh)."""
    setup = resolve_bitflip_config(model, path)
    apply_bitflip_rules(model, setup.rules, setup.seed_mode, setup.base_seed)
    # said at once: compiling every flip site's Philox makes the first forward the slow one
    print(f"bitflip: {sum(row.flipped for row in setup.table)} of {len(setup.table)} Linear layers flip; the first "
          f"forward compiles their flips, which can take minutes on a CPU", file=sys.stderr, flush=True)
    return setup

