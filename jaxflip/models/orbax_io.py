"""The jaxflip (Orbax) model checkpoint: one folder that eval, training and the converters
share; written and read here (``save``, ``load``, ``CheckpointWriter``, ``CheckpointSource``).

    PATH/jaxflip_model.json   the LlamaConfig, and the LoRA adapters' rank/alpha/layers if any
    PATH/params/00000/ ...    Orbax checkpoints of the parameters, a flat dict keyed by HF-style
                              names (``model.layers.0.mlp.up_proj.weight``, LoRA factors
                              ``...lora_A``/``lora_B`` included), split in shards of about
                              ``max_shard_bytes`` each
    PATH/tokenizer/           the tokenizer files, when the model came with them

Shards let a converter write a 70B model while holding one shard in host memory, and read one
tensor at a time (Orbax restores a single key of a shard). ``save`` and the converters write
into a sibling temporary folder and rename it into place (``checkpoint_folder.write_aside``),
so PATH is either absent or complete. ``load`` rebuilds the model abstractly (no random
initialisation) and restores each parameter straight into its place, sharded when a mesh is
given. Bitflip settings and seeds are not part of the model: rules are applied after loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxflip.bitflip import BitFlipLoRALinear, named_linears
from jaxflip.bitflip.lora import merged_weight
from jaxflip.models.checkpoint_folder import copy_tokenizer_files, write_aside
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.llama_config import Llama3RopeScaling, LlamaConfig
from jaxflip.models.named_params import (LORA_FACTORS, abstract_model, check_floating, check_params, expected_params,
                                         flat_params, param_state, short_list)
from jaxflip.models.sharding import state_shardings
from jaxflip.models.tensor_io import ConversionError, TensorSource

METADATA_FILE = "jaxflip_model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2
DEFAULT_SHARD_BYTES = 512 << 20  # Orbax holds about 3 copies of a shard while writing it


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


class CheckpointWriter:
    """Fills a (staging) checkpoint folder parameter by parameter, holding at most one shard
    of about ``max_shard_bytes`` in memory.

    ``add`` checks each name and shape against the config and casts to its ``param_dtype``
    (LoRA factors excepted);
    ``finish`` writes the last shard and the metadata and checks that nothing is missing.
    """

    def __init__(self, folder: Path, config: LlamaConfig, *, lora: dict | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.config = config
        self.lora = lora
        self.tokenizer_dir = tokenizer_dir
        self.max_shard_bytes = max_shard_bytes
        self.expected = expected_params(config, lora)
        self.written: set[str] = set()
        self.shard: dict = {}
        self.shard_bytes = 0
        self.shard_count = 0
        self.checkpointer = ocp.StandardCheckpointer()

    def add(self, name: str, value) -> None:
        """``value``: a numpy or jax array (jax arrays may be sharded: Orbax writes each shard
        from its device)."""
        if name not in self.expected:
            raise ValueError(f"{name} is not a parameter of this model")
        if name in self.written or name in self.shard:
            raise ValueError(f"{name} was added twice")
        want = self.expected[name]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the config expects {tuple(want.shape)}")
        # LoRA factors keep the dtype they were trained in (float32 over a bfloat16 base)
        if value.dtype != want.dtype and name.rsplit(".", 1)[-1] not in LORA_FACTORS:
            value = value.astype(want.dtype)
        if self.shard and self.shard_bytes + value.nbytes > self.max_shard_bytes:
            self._write_shard()
        self.shard[name] = value
        self.shard_bytes += value.nbytes

    def _write_shard(self) -> None:
        self.checkpointer.save(self.folder / PARAMS_DIR / f"{self.shard_count:05d}", self.shard)
        self.checkpointer.wait_until_finished()
        self.written.update(self.shard)
        self.shard, self.shard_bytes = {}, 0
        self.shard_count += 1

    def finish(self) -> None:
        if self.shard:
            self._write_shard()
        missing = set(self.expected) - self.written
        if missing:
            raise ValueError(f"parameters never written: {short_list(missing)}")
        metadata = {"format": "jaxflip-llama", "version": FORMAT_VERSION,
                    "config": config_to_dict(self.config), "lora": self.lora}
        (self.folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if self.tokenizer_dir is not None:
            copy_tokenizer_files(self.tokenizer_dir, self.folder / TOKENIZER_DIR)


def save(model: LlamaForCausalLM, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` (and the tokenizer files of ``tokenizer_dir``) to ``path`` atomically."""
    with write_aside(path, overwrite=overwrite) as staging:
        writer = CheckpointWriter(staging, model.config, lora=lora_settings(model), tokenizer_dir=tokenizer_dir,
                                  max_shard_bytes=max_shard_bytes)
        for name, value in flat_params(param_state(model)).items():
            writer.add(name, value)
        writer.finish()
    return Path(path).absolute()


def read_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a jaxflip model checkpoint (no {METADATA_FILE})")
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("format") != "jaxflip-llama" or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {metadata.get('format')!r} "
                         f"version {metadata.get('version')!r}")
    return metadata


def read_config(path: str | os.PathLike) -> tuple[LlamaConfig, dict | None]:
    """The checkpoint's config and LoRA settings."""
    metadata = read_metadata(path)
    return config_from_dict(metadata["config"]), metadata.get("lora")


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's tokenizer folder, or None when it has none."""
    folder = Path(path) / TOKENIZER_DIR
    return folder if folder.is_dir() else None


def stored_params(path: str | os.PathLike) -> dict[str, tuple[Path, ocp.metadata.ArrayMetadata]]:
    """Name -> (shard folder, Orbax array metadata: shape, dtype) of every stored parameter."""
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{path}: no {PARAMS_DIR}/ folder")
    stored = {}
    for shard in sorted(params_dir.iterdir()):
        metadata = ocp.StandardCheckpointer().metadata(shard)
        for name, array in dict(metadata.item_metadata.tree).items():
            stored[name] = (shard, array)
    return stored


def read_param(shard: Path, name: str) -> np.ndarray:
    """One stored parameter as a host numpy array, read alone from its shard."""
    restored = ocp.PyTreeCheckpointer().restore(shard, args=ocp.args.PyTreeRestore(
        item={name: 0}, restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)}, partial_restore=True))
    return restored[name]


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, param_dtype: str | None = None,
         dtype: str | None = None) -> LlamaForCausalLM:
    """The model saved at ``path``. ``mesh``: restore each parameter into its FSDP shard.
    ``param_dtype`` / ``dtype``: override the stored parameter / compute dtypes."""
    metadata = read_metadata(path)
    values = metadata["config"] | {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
    if param_dtype is not None and dtype is None:
        values["dtype"] = param_dtype
    config = config_from_dict(values)
    abstract = abstract_model(config, metadata.get("lora"))
    graphdef, abstract_state = nnx.split(abstract)
    params = param_state(abstract)
    wanted = flat_params(params)
    shardings = {} if mesh is None else flat_params(state_shardings(params, mesh))
    stored = stored_params(path)
    check_params(path, {name: array.shape for name, (_, array) in stored.items()}, wanted)
    check_floating(path, {name: array.dtype for name, (_, array) in stored.items()})
    by_shard: dict[Path, dict] = {}
    for name, (shard, array) in stored.items():
        # restore in the stored dtype (exact) and cast after
        by_shard.setdefault(shard, {})[name] = jax.ShapeDtypeStruct(
            array.shape, array.dtype,
            sharding=shardings.get(name, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    restored = {}
    for shard, targets in by_shard.items():
        restored |= ocp.StandardCheckpointer().restore(shard, targets)
    for variable_path, variable in nnx.to_flat_state(params):
        name = ".".join(str(part) for part in variable_path)
        value = restored.pop(name)
        # LoRA factors keep the dtype they were trained in (float32 over a bfloat16 base)
        # unless a dtype is asked for
        if not (variable_path[-1] in LORA_FACTORS and param_dtype is None):
            value = value.astype(wanted[name].dtype)
        variable.set_value(value)
    model = nnx.merge(graphdef, abstract_state)
    nnx.update(model, params)
    for variable_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param))):
        if isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            variable.set_value(jax.numpy.zeros(variable.shape, variable.dtype))
    return model


class CheckpointSource(TensorSource):
    """A jaxflip checkpoint's parameters. With ``merge_lora``, each adapted weight is read as
    ``W + (B @ A) * alpha / r`` and the factors disappear; without it, a checkpoint with
    adapters is refused (HF and torchtitan Llamas have no place for them)."""

    def __init__(self, path: str | os.PathLike, *, merge_lora: bool):
        try:
            self.config, self.lora = read_config(path)
            self.stored = stored_params(path)
        except FileNotFoundError as error:
            raise ConversionError(str(error)) from None
        if self.lora and not merge_lora:
            raise ConversionError(f"{path} has LoRA adapters ({len(self.lora['layers'])} layers); "
                                  f"pass --merge-lora to fold them into the weights")
        self.adapted = {f"{layer}.weight" for layer in self.lora["layers"]} if self.lora else set()
        self.shapes = {name: tuple(array.shape) for name, (_, array) in self.stored.items()
                       if not name.endswith(LORA_FACTORS)}
        self.dtypes = {name: np.dtype(self.stored[name][1].dtype) for name in self.shapes}

    def _read_stored(self, name: str) -> np.ndarray:
        shard, _ = self.stored[name]
        return read_param(shard, name)

    def read(self, name: str) -> np.ndarray:
        weight = self._read_stored(name)
        if name not in self.adapted:
            return weight
        layer = name.removesuffix(".weight")
        return np.asarray(merged_weight(weight, self._read_stored(f"{layer}.lora_A"),
                                        self._read_stored(f"{layer}.lora_B"), rank=self.lora["rank"],
                                        alpha=self.lora["alpha"]))
