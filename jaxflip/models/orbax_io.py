"""The jaxflip (Orbax) model checkpoint: one folder that eval, training and the converters
share; written and read here (``save``, ``load``, ``CheckpointWriter``, ``CheckpointSource``).

    PATH/jaxflip_model.json   the LlamaConfig, and the LoRA adapters' rank/alpha/layers if any
    PATH/params/00000/ ...    Orbax checkpoints of the parameters, a flat dict keyed by HF-style
                              names (``model.layers.0.mlp.up_proj.weight``, LoRA factors
                              ``...lora_A``/``lora_B`` included), split in shards of about
                              ``max_shard_bytes`` each
    PATH/large_params/NAME/   (version 3) each parameter larger than ``row_block_bytes``: a
                              zarr v3 array (tensorstore), written in blocks of rows of about
                              ``row_block_bytes``, stored in chunks of whole rows
    PATH/tokenizer/           the tokenizer files, when the model came with them

Shards let a converter write a 70B model while holding one shard in host memory, and read one
tensor at a time (Orbax restores a single key of a shard). Orbax holds about three copies of
what it writes, which at 70B width (a 2 GiB embedding) is too much for one tensor: large
tensors bypass it, block by block, so the host holds one block of them (hf-to-orbax reads
just those rows of the safetensors file), and ``load`` reads each device's slice of them
alone. Version 2 checkpoints (no ``large_params/``) read as before.

``save`` and the converters write into a sibling temporary folder and rename it into place
(``checkpoint_folder.write_aside``), so PATH is either absent or complete. ``load`` rebuilds
the model abstractly (no random initialisation) and restores each parameter straight into its
place, sharded when a mesh is given. Bitflip settings and seeds are not part of the model:
rules are applied after loading.
"""

from __future__ import annotations

import contextlib
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
from jaxflip.cli import one_line, os_error_code
from jaxflip.models.checkpoint_folder import copy_tokenizer_files, write_aside
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.llama_config import Llama3RopeScaling, LlamaConfig
from jaxflip.models.named_params import (LORA_FACTORS, abstract_model, check_floating, check_params, expected_params,
                                         flat_params, param_state, short_list)
from jaxflip.models.sharding import array_from_device_slices, state_shardings
from jaxflip.models.tensor_io import (DEFAULT_ROW_BLOCK_BYTES, ConversionError, RowBlockTensor, TensorSource,
                                      above_block, rows_per_block)

METADATA_FILE = "jaxflip_model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
LARGE_PARAMS_DIR = "large_params"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: no large_params/
DEFAULT_SHARD_BYTES = 512 << 20  # Orbax holds about 3 copies of a shard while writing it
CHUNKS_PER_BLOCK = 8  # a block of rows is stored as this many chunks, compressed in parallel


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def config_to_dict(config: LlamaConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> LlamaConfig:
    values = dict(values)
    if values.get("rope_scaling") is not None:
        values["rope_scaling"] = Llama3RopeScaling(**values["rope_scaling"])
    return LlamaConfig(**values)


# the Python types a config field's JSON value may have, by the field's annotation
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "Llama3RopeScaling": (dict,)}


def checked_config(source, values) -> LlamaConfig:
    """The ``LlamaConfig`` of a checkpoint's stored ``values``, or a ``ValueError`` naming
    ``source`` and the field: a hand-edited or corrupt file must not reach a model or an HF
    ``config.json``."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: 'config' is not a JSON object")
    fields = {field.name: field for field in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(values) - set(fields))
    missing = sorted(name for name, field in fields.items()
                     if name not in values and field.default is dataclasses.MISSING)
    if unknown or missing:
        problems = ([f"missing {short_list(missing)}"] if missing else []) + (
            [f"unknown {short_list(unknown)}"] if unknown else [])
        raise ValueError(f"{source}: config fields {'; '.join(problems)}")
    for name, value in values.items():
        kind, _, optional = fields[name].type.partition(" | ")
        if value is None and optional:
            continue
        allowed = _FIELD_TYPES[kind]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"{source}: config field {name} is {value!r}, not of type {kind}")
        if kind == "int" and value < 1:
            raise ValueError(f"{source}: config field {name} is {value}, not a positive integer")
    try:
        return config_from_dict(values)
    except (TypeError, ValueError) as error:  # rope_scaling's fields; LlamaConfig's own checks
        raise ValueError(f"{source}: {' '.join(str(error).split())}") from None


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


def open_large_param(path: Path, *, create_like: jax.ShapeDtypeStruct | None = None, chunk_rows: int = 0):
    """The zarr v3 array of a large parameter; with ``create_like``, created (chunks of
    ``chunk_rows`` whole rows, zstd-compressed as Orbax compresses: weights' exponents shrink
    by about a quarter)."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if create_like is None:
        return ts.open(spec, open=True).result()
    shape = tuple(create_like.shape)
    spec["metadata"] = {"codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                   {"name": "zstd", "configuration": {"level": 3}}]}
    return ts.open(spec, create=True, dtype=ts.dtype(np.dtype(create_like.dtype)), shape=shape,
                   chunk_layout=ts.ChunkLayout(chunk_shape=(chunk_rows, *shape[1:]))).result()


class CheckpointWriter:
    """Fills a (staging) checkpoint folder parameter by parameter, holding at most one shard
    of about ``max_shard_bytes`` in memory, or one block of ``row_block_bytes`` of a larger
    parameter.

    ``add`` checks each name and shape against the config and casts to its ``param_dtype``
    (LoRA factors excepted); ``add_from`` does the same for a tensor of a ``TensorSource``,
    reading a large one a block of rows at a time;
    ``finish`` writes the last shard and the metadata and checks that nothing is missing.
    """

    def __init__(self, folder: Path, config: LlamaConfig, *, lora: dict | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 row_block_bytes: int = DEFAULT_ROW_BLOCK_BYTES):
        self.folder = Path(folder)
        self.config = config
        self.lora = lora
        self.tokenizer_dir = tokenizer_dir
        self.max_shard_bytes = max_shard_bytes
        self.row_block_bytes = row_block_bytes
        self.expected = expected_params(config, lora)
        self.written: set[str] = set()
        self.shard: dict = {}
        self.shard_bytes = 0
        self.shard_count = 0
        self.checkpointer = ocp.StandardCheckpointer()

    def _checked_dtype(self, name: str, shape: tuple[int, ...], dtype) -> np.dtype:
        """The dtype ``name`` is stored in, after checking it is a new parameter of ``shape``."""
        if name not in self.expected:
            raise ValueError(f"{name} is not a parameter of this model")
        if name in self.written or name in self.shard:
            raise ValueError(f"{name} was added twice")
        want = self.expected[name]
        if tuple(shape) != tuple(want.shape):
            raise ValueError(f"{name} has shape {tuple(shape)}, the config expects {tuple(want.shape)}")
        # LoRA factors keep the dtype they were trained in (float32 over a bfloat16 base)
        return np.dtype(dtype if name.rsplit(".", 1)[-1] in LORA_FACTORS else want.dtype)

    def _write_large(self, name: str, shape: tuple[int, ...], dtype: np.dtype, pieces) -> None:
        """Write ``pieces`` (``(index, rows)`` pairs: where a part of the parameter goes, and
        the part, sliced a block of rows at a time) block by block, each block read while the
        one before is compressed and written (two blocks in memory)."""
        chunk_rows = rows_per_block(shape, dtype, self.row_block_bytes)
        array = open_large_param(self.folder / LARGE_PARAMS_DIR / name, create_like=jax.ShapeDtypeStruct(shape, dtype),
                                 chunk_rows=max(1, chunk_rows // CHUNKS_PER_BLOCK))
        in_flight = None
        for index, rows in pieces:
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            first, last, _ = index[0].indices(shape[0])
            for start in range(first, last, chunk_rows):
                stop = min(start + chunk_rows, last)
                block = np.asarray(rows[start - first:stop - first]).astype(dtype, copy=False)
                writing = array[(slice(start, stop), *index[1:])].write(block)
                if in_flight is not None:
                    in_flight.result()
                in_flight = writing
        if in_flight is not None:
            in_flight.result()
        self.written.add(name)

    def add(self, name: str, value) -> None:
        """``value``: a numpy or jax array (jax arrays may be sharded: each shard is written
        from its device, never gathered)."""
        dtype = self._checked_dtype(name, value.shape, value.dtype)
        if above_block(value.shape, dtype, self.row_block_bytes):
            if isinstance(value, jax.Array):  # one shard on the host at a time, as Orbax would
                pieces = ((shard.index, np.asarray(shard.data))
                          for shard in value.addressable_shards if shard.replica_id == 0)
            else:
                pieces = [((), value)]
            self._write_large(name, tuple(value.shape), dtype, pieces)
            return
        if value.dtype != dtype:
            value = value.astype(dtype)
        if self.shard and self.shard_bytes + value.nbytes > self.max_shard_bytes:
            self._write_shard()
        self.shard[name] = value
        self.shard_bytes += value.nbytes

    def add_from(self, source: TensorSource, name: str) -> None:
        """``source``'s tensor ``name``; a large one read and written a block of rows at a time."""
        shape, source_dtype = source.shapes[name], source.dtypes[name]
        dtype = self._checked_dtype(name, shape, source_dtype)
        if above_block(shape, dtype, self.row_block_bytes):
            self._write_large(name, shape, dtype, [((), RowBlockTensor(source, name, self.row_block_bytes))])
        else:
            self.add(name, source.read(name))

    def _write_shard(self) -> None:
        self.checkpointer.save(self.folder / PARAMS_DIR / f"{self.shard_count:05d}", self.shard)
        self.checkpointer.wait_until_finished()
        self.written.update(self.shard)
        self.shard, self.shard_bytes = {}, 0
        self.shard_count += 1

    def finish(self) -> None:
        if self.shard:
            self._write_shard()
        (self.folder / PARAMS_DIR).mkdir(exist_ok=True)  # empty when every parameter is large
        missing = set(self.expected) - self.written
        if missing:
            raise ValueError(f"parameters never written: {short_list(missing)}")
        metadata = {"format": "jaxflip-llama", "version": FORMAT_VERSION,
                    "config": config_to_dict(self.config), "lora": self.lora}
        (self.folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if self.tokenizer_dir is not None:
            copy_tokenizer_files(self.tokenizer_dir, self.folder / TOKENIZER_DIR)


def save(model: LlamaForCausalLM, path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         row_block_bytes: int = DEFAULT_ROW_BLOCK_BYTES) -> Path:
    """Write ``model`` (and the tokenizer files of ``tokenizer_dir``) to ``path`` atomically."""
    with write_aside(path, overwrite=overwrite) as staging:
        writer = CheckpointWriter(staging, model.config, lora=lora_settings(model), tokenizer_dir=tokenizer_dir,
                                  max_shard_bytes=max_shard_bytes, row_block_bytes=row_block_bytes)
        for name, value in flat_params(param_state(model)).items():
            writer.add(name, value)
        writer.finish()
    return Path(path).absolute()


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's ``jaxflip_model.json``, its config checked (``checked_config``)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a jaxflip model checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
    except ValueError as error:  # cut short, or not text
        raise ValueError(f"{path / METADATA_FILE}: not readable JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "jaxflip-llama" or (
            metadata.get("version") not in READABLE_VERSIONS):
        found = metadata if isinstance(metadata, dict) else {}
        raise ValueError(f"{path}: unsupported checkpoint format {found.get('format')!r} "
                         f"version {found.get('version')!r}")
    checked_config(path / METADATA_FILE, metadata.get("config"))
    return metadata


def read_config(path: str | os.PathLike) -> tuple[LlamaConfig, dict | None]:
    """The checkpoint's config and LoRA settings."""
    metadata = read_metadata(path)
    return config_from_dict(metadata["config"]), metadata.get("lora")


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's tokenizer folder, or None when it has none."""
    folder = Path(path) / TOKENIZER_DIR
    return folder if folder.is_dir() else None


def stored_params(path: str | os.PathLike) -> dict[str, tuple[Path, ocp.metadata.ArrayMetadata | jax.ShapeDtypeStruct]]:
    """Name -> (where: its Orbax shard folder, or its own zarr array for a large one;
    its shape and dtype) of every stored parameter."""
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{path}: no {PARAMS_DIR}/ folder")
    stored = {}
    for shard in sorted(params_dir.iterdir()):
        try:
            metadata = ocp.StandardCheckpointer().metadata(shard).item_metadata
        except (OSError, ValueError) as error:
            raise ValueError(f"{shard}: not a readable Orbax checkpoint ({one_line(error)})") from None
        if metadata is None:  # Orbax says nothing when its _METADATA file is gone
            raise ValueError(f"{shard}: an incomplete Orbax checkpoint (no metadata of its arrays)")
        for name, array in dict(metadata.tree).items():
            stored[name] = (shard, array)
    large_dir = params_dir.parent / LARGE_PARAMS_DIR
    for location in sorted(large_dir.iterdir()) if large_dir.is_dir() else ():
        array = open_large_param(location)
        stored[location.name] = (location, jax.ShapeDtypeStruct(tuple(array.shape), array.dtype.numpy_dtype))
    return stored


@contextlib.contextmanager
def reading(location: Path):
    """A stored parameter that does not read back (a truncated or corrupt file: tensorstore's
    and Orbax's errors, of any type) becomes a ``ValueError`` naming its file; an OS fault
    (the disk, permissions) stays the environment's."""
    try:
        yield
    except Exception as error:
        if isinstance(error, OSError) or os_error_code(error) is not None:
            raise
        raise ValueError(f"{location}: stored weights do not read back ({one_line(error)})") from None


def is_large_param(location: Path) -> bool:
    return location.parent.name == LARGE_PARAMS_DIR


def read_param(location: Path, name: str) -> np.ndarray:
    """One stored parameter as a host numpy array, read alone from its shard or zarr array."""
    with reading(location):
        if is_large_param(location):
            return open_large_param(location).read().result()
        restored = ocp.PyTreeCheckpointer().restore(location, args=ocp.args.PyTreeRestore(
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
    restored = {}
    for name, (location, array) in stored.items():
        # restore in the stored dtype (exact) and cast after
        sharding = shardings.get(name, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        if is_large_param(location):
            # each device's slice read alone: the host holds one slice at a time
            with reading(location):
                stored_array = open_large_param(location)
                restored[name] = array_from_device_slices(
                    tuple(array.shape), sharding, lambda index, a=stored_array: a[index].read().result())
        else:
            by_shard.setdefault(location, {})[name] = jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)
    for shard, targets in by_shard.items():
        with reading(shard):
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
        check_params(path, {name: array.shape for name, (_, array) in self.stored.items()},
                     expected_params(self.config, self.lora))
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
