"""HF transformers Llama checkpoints: read (``hf-to-orbax``, ``load_hf_model``) and write
(``orbax-to-hf``).

An HF model is a folder with ``config.json``, the weights (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``; or the older ``pytorch_model.bin`` and its
index) and usually the tokenizer files; or a hub id, downloaded when online. HF's state-dict
keys are the jaxflip parameter names and both keep torch's ``(out, in)`` layout, so tensors
copy over unchanged, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxflip.convert.common import (BFLOAT16, CheckpointSource, ConversionError, Progress, TensorSource,
                                    TorchFileSource, load_torch_file, resolve_dtype)
from jaxflip.models.checkpoint import (DEFAULT_SHARD_BYTES, CheckpointWriter, check_floating, check_params,
                                       copy_tokenizer_files, expected_params, tokenizer_path, write_aside)
from jaxflip.models.config import LlamaConfig, config_from_hf
from jaxflip.models.hf import llama_from_hf_state_dict
from jaxflip.models.llama import LlamaForCausalLM

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BFLOAT16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def resolve_hf_folder(path_or_hub_id: str | os.PathLike) -> Path:
    """The local folder of an HF model: ``path_or_hub_id`` itself, or its hub download."""
    path = Path(path_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: not a folder (an HF model is a folder with config.json and weights)")
        return path
    if not HUB_ID.fullmatch(str(path_or_hub_id)):
        raise ConversionError(f"{path}: no such file or folder")
    from huggingface_hub import snapshot_download

    from jaxflip.data.sources import hub_failure

    try:
        folder = Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an older repository: torch.save weights only
            folder = Path(snapshot_download(str(path_or_hub_id), allow_patterns=["pytorch_model*.bin"]))
    except Exception as error:  # noqa: BLE001 (network, authentication, unknown repository: all end the same way)
        raise hub_failure(str(path_or_hub_id), error) from None
    return folder


def read_hf_config(folder: Path) -> dict:
    """``config.json``, refused unless it describes a Llama."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json")
    try:
        hf_config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if model_type != "llama" or (architectures and LLAMA_ARCHITECTURE not in architectures):
        raise ConversionError(f"{folder}: not a Llama model (architectures {architectures}, model_type {model_type!r}); "
                              f"only {LLAMA_ARCHITECTURE} is supported")
    return hf_config


def llama_config(folder: Path, hf_config: dict, param_dtype: str) -> LlamaConfig:
    try:
        return config_from_hf(hf_config, param_dtype=param_dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise ConversionError(f"{folder}/config.json: not a usable Llama config ({type(error).__name__}: {error})") from None


class SafetensorsSource(TensorSource):
    """The tensors of one or more safetensors files. Each tensor is read with a plain file
    read: ``safe_open`` memory-maps the files, and every page it touches would count as this
    process's memory until the whole model had passed through."""

    def __init__(self, files: list[Path]):
        self.locations = {}  # name -> (file, byte offset, byte count)
        self.shapes, self.dtypes = {}, {}
        for file in files:
            header, data_start = read_safetensors_header(file)
            data_bytes = file.stat().st_size - data_start
            for name, entry in header.items():
                shape, dtype, (begin, end) = safetensors_entry(file, name, entry, data_bytes)
                self.locations[name] = (file, data_start + begin, end - begin)
                self.shapes[name] = shape
                self.dtypes[name] = dtype

    def read(self, name: str) -> np.ndarray:
        file, offset, count = self.locations[name]
        array = np.empty(self.shapes[name], self.dtypes[name])  # of count bytes: see safetensors_entry
        with open(file, "rb") as f:
            f.seek(offset)
            if f.readinto(array.reshape(-1).view(np.uint8)) != count:
                raise ConversionError(f"{file}: ends inside tensor {name}")
        return array


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data offsets) and where the data starts:
    the file is an 8-byte little-endian header length, the JSON header, then the data."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, os.fstat(f.fileno()).st_size - 8):
                raise ValueError(f"a header of {length} bytes, beyond the file or the format's limit")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: not a readable safetensors file (the header is a {type(header).__name__}, "
                              f"not a table of tensors)")
    header.pop("__metadata__", None)
    return header, 8 + length


def safetensors_entry(file: Path, name: str, entry, data_bytes: int) -> tuple[tuple, np.dtype, tuple[int, int]]:
    """``(shape, dtype, (begin, end))`` of one header entry, checked: a known dtype, a shape of
    integers >= 0 whose bytes are ``end - begin``, offsets within the file's ``data_bytes``."""
    def is_index(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict):
        raise ConversionError(f"{file}: header entry {name} is not a table")
    if entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise ConversionError(f"{file}: {name} has dtype {entry.get('dtype')}, which is not supported")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(is_index(size) for size in shape):
        raise ConversionError(f"{file}: {name} has no valid shape (a list of integers >= 0), got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes):
        raise ConversionError(f"{file}: {name} has no valid data_offsets within the file's {data_bytes} data bytes, "
                              f"got {offsets!r}")
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise ConversionError(f"{file}: {name} takes {offsets[1] - offsets[0]} bytes, not the "
                              f"{math.prod(shape) * dtype.itemsize} of its shape {shape} and dtype {entry['dtype']}")
    return tuple(shape), dtype, tuple(offsets)


def sharded_files(index_path: Path) -> list[Path]:
    """The files an HF ``*.index.json`` lists, each checked to exist."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ConversionError(f"{index_path}: not an HF weight index ({type(error).__name__}: {error})") from None
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    absent = [file.name for file in files if not file.is_file()]
    if absent:
        raise ConversionError(f"{index_path} lists {', '.join(absent)}, which is not there")
    return files


def open_hf_weights(folder: Path) -> TensorSource:
    if (folder / "model.safetensors").is_file():
        return SafetensorsSource([folder / "model.safetensors"])
    if (folder / "model.safetensors.index.json").is_file():
        return SafetensorsSource(sharded_files(folder / "model.safetensors.index.json"))
    if (folder / "pytorch_model.bin").is_file():
        return TorchFileSource([load_torch_file(folder / "pytorch_model.bin")])
    if (folder / "pytorch_model.bin.index.json").is_file():
        return TorchFileSource([load_torch_file(file) for file in sharded_files(folder / "pytorch_model.bin.index.json")])
    raise ConversionError(f"{folder}: no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                          f"or pytorch_model.bin.index.json)")


def parameter_names(source: TensorSource, tied: bool) -> list[str]:
    """The source's tensors that are parameters: not RoPE frequency buffers (older HF
    checkpoints store them) nor a tied LM head (it repeats the embedding)."""
    return [name for name in source.shapes if not name.endswith("rotary_emb.inv_freq")
            and not (tied and name == "lm_head.weight")]


def open_hf(path_or_hub_id: str | os.PathLike, dtype: str) -> tuple[Path, TensorSource, LlamaConfig, list[str]]:
    """An HF Llama's folder, tensors, config (``dtype``: see ``resolve_dtype``) and parameter
    names, checked against each other before any weight is read."""
    folder = resolve_hf_folder(path_or_hub_id)
    hf_config = read_hf_config(folder)
    source = open_hf_weights(folder)
    names = parameter_names(source, tied=hf_config.get("tie_word_embeddings", False))
    check_floating(folder, {name: source.dtypes[name] for name in names})
    config = llama_config(folder, hf_config, resolve_dtype(dtype, [source.dtypes[name] for name in names]))
    check_params(folder, {name: source.shapes[name] for name in names}, expected_params(config))
    return folder, source, config, names


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


class _StreamingStateDict(Mapping):
    """A state dict that reads each tensor when it is looked up (once, by
    ``llama_from_hf_state_dict``), so one tensor is in host memory at a time."""

    def __init__(self, source: TensorSource, names: list[str], progress: Progress):
        self.source, self.names, self.progress = source, names, progress

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.source.read(name)
        self.progress.update(array)
        return array

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_hf_model(path_or_hub_id: str | os.PathLike, *, mesh: Mesh | None = None,
                  param_dtype: str | None = None, dtype: str | None = None) -> tuple[LlamaForCausalLM, Path | None]:
    """An HF Llama (folder or hub id) as a ``LlamaForCausalLM``, and its folder when it holds
    tokenizer files (else None). Tensors stream in one at a time, each straight into its
    (``mesh``-sharded) place. ``param_dtype``: None keeps the checkpoint's (float32 or
    bfloat16; float16 becomes float32). ``dtype``: the compute dtype (None: ``param_dtype``)."""
    folder, source, config, names = open_hf(path_or_hub_id, param_dtype or "keep")
    if dtype is not None:
        config = LlamaConfig(**(dataclasses.asdict(config) | {"dtype": dtype, "rope_scaling": config.rope_scaling}))
    with Progress(len(names), f"loading {path_or_hub_id}") as progress:
        model = llama_from_hf_state_dict(config, _StreamingStateDict(source, names, progress), mesh=mesh)
    return model, folder if has_tokenizer(folder) else None


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Convert an HF Llama (folder or hub id) into a jaxflip checkpoint at ``dst``, tokenizer
    files included. Returns the summary line."""
    folder, source, config, names = open_hf(src, dtype)
    with (Progress(len(names), f"hf-to-orbax {config.param_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging):
        writer = CheckpointWriter(staging, config, tokenizer_dir=folder if has_tokenizer(folder) else None,
                                  max_shard_bytes=max_shard_bytes)
        for name in names:
            array = source.read(name).astype(config.param_dtype, copy=False)
            writer.add(name, array)
            progress.update(array)
        writer.finish()
    return progress.summary()


def hf_config_dict(config: LlamaConfig, dtype: str) -> dict:
    """``config.json`` of an HF ``LlamaForCausalLM``, readable by transformers 4 (``rope_theta``
    and ``rope_scaling``) and 5 (``rope_parameters``)."""
    scaling = None if config.rope_scaling is None else {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    return {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": (scaling or {"rope_type": "default"}) | {"rope_theta": config.rope_theta},
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def special_token_ids(tokenizer_dir: Path | None) -> dict:
    """``bos_token_id`` and ``eos_token_id`` for ``config.json``, from the checkpoint's
    tokenizer (a jaxflip checkpoint keeps them nowhere else; transformers' ``generate`` reads
    them from the config); none without a tokenizer."""
    if tokenizer_dir is None:
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


class SafetensorsShardWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` files of about
    ``max_shard_bytes`` and their ``model.safetensors.index.json`` (one ``model.safetensors``
    when everything fits in one), holding one shard in memory."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.shard: dict[str, np.ndarray] = {}
        self.shard_bytes = self.total_bytes = 0
        self.files: list[list[str]] = []  # the names in each written shard

    def add(self, name: str, array: np.ndarray) -> None:
        if self.shard and self.shard_bytes + array.nbytes > self.max_shard_bytes:
            self._write_shard()
        self.shard[name] = np.ascontiguousarray(array)
        self.shard_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _write_shard(self) -> None:
        from safetensors.numpy import save_file

        save_file(self.shard, self.folder / f"shard-{len(self.files)}.safetensors", metadata={"format": "pt"})
        self.files.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0

    def finish(self) -> None:
        if self.shard:
            self._write_shard()
        if len(self.files) == 1:
            os.replace(self.folder / "shard-0.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            file_name = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.safetensors", self.folder / file_name)
            weight_map |= dict.fromkeys(names, file_name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", merge_lora: bool = False,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Convert a jaxflip checkpoint into an HF Llama folder (safetensors, config.json, the
    checkpoint's tokenizer files). ``merge_lora``: fold LoRA adapters into their weights.
    Returns the summary line."""
    source = CheckpointSource(src, merge_lora=merge_lora)
    out_dtype = resolve_dtype(dtype, source.dtypes.values())
    with (Progress(len(source.shapes), f"orbax-to-hf {out_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging):
        writer = SafetensorsShardWriter(staging, max_shard_bytes)
        for name in source.shapes:
            array = source.read(name).astype(out_dtype, copy=False)
            writer.add(name, array)
            progress.update(array)
        writer.finish()
        config = hf_config_dict(source.config, out_dtype) | special_token_ids(tokenizer_path(src))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_path(src) is not None:
            copy_tokenizer_files(tokenizer_path(src), staging)
    return progress.summary()
