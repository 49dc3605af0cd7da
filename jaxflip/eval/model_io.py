"""What every eval command starts from: the model of ``--checkpoint``, its tokenizer, and the
bitflip settings of ``--bitflip-config`` (read once by the CLI into ``args.bitflip``) matched to
its layers."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxflip.bitflip import BitflipConfig, RuleTable, apply_rule_table, named_linears
from jaxflip.data import load_tokenizer
from jaxflip.models import LlamaForCausalLM, open_checkpoint
from jaxflip.models.orbax_io import METADATA_FILE
from jaxflip.models.sharding import make_mesh

RUN_MODEL_DIR = "model"  # where a training run exports its model (jaxflip.train.loop.export_model)
RUN_METRICS_FILE = "metrics.jsonl"  # what every training run folder holds from its first logged step


def resolve_checkpoint(checkpoint: str) -> str:
    """``checkpoint``, or the model of a training run folder (``runs/quickstart`` ->
    ``runs/quickstart/model``, said in one line): a user passes the run folder they trained.
    A run folder holds a ``config.json`` too (the training config, not an HF one), so its
    ``model/`` decides; a run folder without one yet is a one-line error saying why."""
    folder = Path(checkpoint)
    if (folder / METADATA_FILE).is_file():
        return checkpoint
    model = folder / RUN_MODEL_DIR
    if (model / METADATA_FILE).is_file():
        print(f"note: {checkpoint} is a training run folder; evaluating its model {model}", file=sys.stderr)
        return str(model)
    if (folder / RUN_METRICS_FILE).is_file():
        raise ValueError(f"{checkpoint} is a training run folder without a model yet: the run writes {model} when "
                         f"it finishes (run its training command again to finish it)")
    return checkpoint


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
    """The bitflip settings of a ``--bitflip-config`` file matched to one model's layers."""

    path: str
    config: BitflipConfig
    table: RuleTable

    def summary(self) -> dict:
        """The JSON record of what was flipped."""
        return {"config": self.path, "seed_mode": self.config.resolved_seed_mode,
                "base_seed": self.config.resolved_base_seed,
                "flipped_layers": [row.layer for row in self.table if row.flipped]}

    def apply(self, model: LlamaForCausalLM) -> BitflipSetup:
        """Configure ``model``'s flips as the table says (its seeds start afresh)."""
        apply_rule_table(model, self.table, self.config.exact)
        # said at once: compiling every flip site's Philox makes the first forward the slow one
        print(f"bitflip: {sum(row.flipped for row in self.table)} of {len(self.table)} Linear layers flip; the "
              f"first forward compiles their flips, which can take minutes on a CPU", file=sys.stderr, flush=True)
        return self


def resolve_bitflip(model: LlamaForCausalLM, args) -> BitflipSetup | None:
    """``args.bitflip`` (the settings of ``--bitflip-config``) matched to ``model``'s layers and
    checked, None without one; nothing is configured yet (a command that runs clean first
    resolves before the clean pass, and applies after it)."""
    if args.bitflip is None:
        return None
    try:
        table = args.bitflip.match(named_linears(model))
    except ValueError as error:
        raise ValueError(f"{args.bitflip_config}: {error}") from None
    if not any(row.flipped for row in table):
        raise ValueError(f"{args.bitflip_config}: the bitflip rules flip no layer of this model")
    return BitflipSetup(args.bitflip_config, args.bitflip, table)
