"""The jaxflip model checkpoint: one folder that eval, training and the converters share.

    PATH/jaxflip_model.json   the LlamaConfig, and the LoRA adapters' rank/alpha/layers if any
    PATH/params/              Orbax checkpoint of the model's parameters (LoRA factors included)
    PATH/tokenizer/           the tokenizer files, when the model came with them

``save`` writes everything into a sibling temporary folder and renames it into place, so PATH
is either absent or complete. ``load`` rebuilds the model abstractly (no random
initialisation) and restores each parameter straight into its place, sharded when a mesh is
given. Bitflip settings and seeds are not part of the model: rules are applied after loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxflip.bitflip import BitFlipLoRALinear, add_lora, named_linears
from jaxflip.models.config import Llama3RopeScaling, LlamaConfig
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.sharding import state_shardings

METADATA_FILE = "jaxflip_model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def config_to_dict(config: LlamaConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> LlamaConfig:
    values = dict(values)
    if values.get("rope_scaling") is not None:
        values["rope_scaling"] = Llama3RopeScaling(**values["rope_scaling"])
    return LlamaConfig(**values)


def lora_settings(model: LlamaForCausalLM) -> dict | None:
    """``{"rank", "alpha", "layers"}`` of the model's LoRA adapters, or None without any."""
    adapters = {name: linear for name, linear in named_linears(model).items() if isinstance(linear, BitFlipLoRALinear)}
    if not adapters:
        return None
    ranks = {(linear.rank, linear.alpha) for linear in adapters.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA adapters with different rank/alpha cannot be saved together: {sorted(ranks)}")
    (rank, alpha), = ranks
    return {"rank": rank, "alpha": alpha, "layers": sorted(adapters)}


def param_state(model: nnx.Module) -> nnx.State:
    """Every parameter (``nnx.Param``, LoRA factors included), not the bitflip seeds."""
    return nnx.state(model, nnx.Param)


def flat_params(state: nnx.State) -> dict:
    """``{"model.layers.0.mlp.up_proj.weight": value}``: HF-style names, the checkpoint's keys."""
    return {".".join(str(part) for part in path): variable.get_value()
            for path, variable in nnx.to_flat_state(state)}


def save(model: LlamaForCausalLM, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = False) -> Path:
    """Write ``model`` (and the tokenizer files of ``tokenizer_dir``) to ``path`` atomically."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        metadata = {"format": "jaxflip-llama", "version": FORMAT_VERSION,
                    "config": config_to_dict(model.config), "lora": lora_settings(model)}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, staging / TOKENIZER_DIR)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, flat_params(param_state(model)))
        checkpointer.wait_until_finished()
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def copy_tokenizer_files(source: str | os.PathLike, destination: Path) -> list[str]:
    """Copy the tokenizer files present in ``source``; returns their names."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, destination / name)
            copied.append(name)
    return copied


def read_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a jaxflip model checkpoint (no {METADATA_FILE})")
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("format") != "jaxflip-llama" or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {metadata.get('format')!r} "
                         f"version {metadata.get('version')!r}")
    return metadata


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's tokenizer folder, or None when it has none."""
    folder = Path(path) / TOKENIZER_DIR
    return folder if folder.is_dir() else None


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, param_dtype: str | None = None,
         dtype: str | None = None) -> LlamaForCausalLM:
    """The model saved at ``path``. ``mesh``: restore each parameter into its FSDP shard.
    ``param_dtype`` / ``dtype``: override the stored parameter / compute dtypes."""
    metadata = read_metadata(path)
    values = metadata["config"] | {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
    if param_dtype is not None and dtype is None:
        values["dtype"] = param_dtype
    config = config_from_dict(values)
    lora = metadata.get("lora")

    def build():
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        if lora:
            add_lora(model, rank=lora["rank"], alpha=lora["alpha"], rngs=nnx.Rngs(0),
                     skip=tuple(set(named_linears(model)) - set(lora["layers"])))
        return model

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    params = param_state(abstract)
    wanted = flat_params(params)
    shardings = {} if mesh is None else flat_params(state_shardings(params, mesh))
    params_dir = Path(path).absolute() / PARAMS_DIR
    stored = ocp.StandardCheckpointer().metadata(params_dir)
    stored = dict(stored.item_metadata.tree if hasattr(stored, "item_metadata") else stored)
    missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not fit the config: missing {missing}, unexpected {unexpected}")
    targets = {}
    for name, want in wanted.items():
        if tuple(stored[name].shape) != tuple(want.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(stored[name].shape)}, the config expects {tuple(want.shape)}")
        # restore in the stored dtype (exact) and cast after
        targets[name] = jax.ShapeDtypeStruct(want.shape, stored[name].dtype, sharding=shardings.get(
            name, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    restored = ocp.StandardCheckpointer().restore(params_dir, targets)
    for variable_path, variable in nnx.to_flat_state(params):
        name = ".".join(str(part) for part in variable_path)
        variable.set_value(restored.pop(name).astype(wanted[name].dtype))
    model = nnx.merge(graphdef, abstract_state)
    nnx.update(model, params)
    for variable_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param))):
        if isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            variable.set_value(jax.numpy.zeros(variable.shape, variable.dtype))
    return model

