"""HF transformers Llama checkpoints: open one (``open_hf``), load it as a model
(``load_hf_model``, through ``llama_from_hf_state_dict``), and the ``config.json`` and
tokenizer files a written one carries (``write_hf_config``). The converters ``hf-to-orbax``
and ``orbax-to-hf`` (``jaxflip.convert.hf_orbax``) are built on these.

An HF model is a folder with ``config.json``, the weights (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``; or the older ``pytorch_model.bin`` and its
index) and usually the tokenizer files; or a hub id, downloaded when online. HF's state-dict
keys are the jaxflip parameter names and both keep torch's ``(out, in)`` layout, so tensors
copy over unchanged, one at a time, straight into their (optionally sharded) place: the
randomly initialised model is never materialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxflip.bitflip import LM_HEAD, BitflipState
from jaxflip.data.sources import hub_failure
from jaxflip.models.checkpoint_folder import copy_tokenizer_files, has_tokenizer
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.llama_config import LlamaConfig, config_from_hf
from jaxflip.models.named_params import check_floating, check_params, expected_params
from jaxflip.models.safetensors_io import SafetensorsSource
from jaxflip.models.sharding import array_from_device_slices, state_shardings
from jaxflip.models.tensor_io import (DEFAULT_ROW_BLOCK_BYTES, ConversionError, Progress, RowBlockTensor, TensorSource,
                                      TorchFileSource, above_block, load_torch_file, resolve_dtype, torch_to_numpy)

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
# in an HF state dict but not parameters: the tied head repeats embed_tokens.weight
LM_HEAD_WEIGHT = f"{LM_HEAD}.weight"


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
            and not (tied and name == LM_HEAD_WEIGHT)]


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


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (exactly, any float dtype) or an array as numpy."""
    return torch_to_numpy(tensor) if hasattr(tensor, "detach") else np.asarray(tensor)


def llama_from_hf_state_dict(config: LlamaConfig | Mapping, state_dict: Mapping, *, mesh: Mesh | None = None) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding the tensors of an HF ``LlamaForCausalLM`` state dict
    (torch tensors, arrays, or ``RowBlockTensor``s: each device's slice read alone), cast to
    ``config.param_dtype``.

    ``config``: a ``LlamaConfig`` or an HF config (dict, path or ``transformers`` config; see
    ``config_from_hf``). With ``mesh``, each tensor goes straight to its sharded layout.
    Raises ``ValueError`` on missing, unexpected or mis-shaped tensors.
    """
    if not isinstance(config, LlamaConfig):
        config = config_from_hf(config)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat_state = nnx.to_flat_state(abstract_state)
    keys = {path: ".".join(str(part) for part in path)
            for path, variable in flat_state if not isinstance(variable, BitflipState)}
    ignored = {key for key in state_dict if key.endswith("rotary_emb.inv_freq")}  # older HF checkpoints
    if config.tie_word_embeddings:
        ignored.add(LM_HEAD_WEIGHT)
    missing = sorted(set(keys.values()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys.values()) - ignored)
    if missing or unexpected:
        raise ValueError(f"HF state dict does not fit the model: missing {missing}, unexpected {unexpected}")

    shardings = {} if mesh is None else dict(nnx.to_flat_state(state_shardings(abstract_state, mesh)))
    loaded = []
    for path, variable in flat_state:
        if path in keys:
            value = state_dict[keys[path]]
            value = value if isinstance(value, RowBlockTensor) else _to_numpy(value)
            if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
                raise ValueError(f"{keys[path]!r}: HF tensor holds {value.dtype} values, not floating point; "
                                 f"weights are not cast from integers")
            if value.shape != variable.shape:
                raise ValueError(f"{keys[path]!r}: HF tensor has shape {value.shape}, the model expects {variable.shape}")
        else:  # a bitflip seed or flip setting: zeros, no flips
            value = np.zeros(variable.shape, variable.dtype)
        sharding = shardings[path].get_value() if path in shardings else None
        if isinstance(value, RowBlockTensor):
            array = array_from_device_slices(
                value.shape, sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                lambda index, tensor=value, dtype=variable.dtype: tensor.read(index).astype(dtype, copy=False))
        else:
            array = jax.device_put(value.astype(variable.dtype), sharding)
        loaded.append((path, variable.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


class _StreamingStateDict(Mapping):
    """A state dict that reads each tensor when it is looked up (once, by
    ``llama_from_hf_state_dict``), so one tensor is in host memory at a time; one larger than
    ``row_block_bytes`` comes as a ``RowBlockTensor``, so only a device's slice of it is."""

    def __init__(self, source: TensorSource, names: list[str], progress: Progress, row_block_bytes: int):
        self.source, self.names, self.progress = source, names, progress
        self.row_block_bytes = row_block_bytes

    def __getitem__(self, name: str) -> np.ndarray | RowBlockTensor:
        shape = self.source.shapes[name]
        if shape and above_block(shape, self.source.dtypes[name], self.row_block_bytes):
            array = RowBlockTensor(self.source, name, self.row_block_bytes)
        else:
            array = self.source.read(name)
        self.progress.update(array)
        return array

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_hf_model(path_or_hub_id: str | os.PathLike, *, mesh: Mesh | None = None,
                  param_dtype: str | None = None, dtype: str | None = None,
                  row_block_bytes: int = DEFAULT_ROW_BLOCK_BYTES) -> tuple[LlamaForCausalLM, Path | None]:
    """An HF Llama (folder or hub id) as a ``LlamaForCausalLM``, and its folder when it holds
    tokenizer files (else None). Tensors stream in one at a time, each straight into its
    (``mesh``-sharded) place; of one larger than ``row_block_bytes``, each device reads its
    own slice a block of rows at a time. ``param_dtype``: None keeps the checkpoint's (float32
    or bfloat16; float16 becomes float32). ``dtype``: the compute dtype (None: ``param_dtype``)."""
    folder, source, config, names = open_hf(path_or_hub_id, param_dtype or "keep")
    if dtype is not None:
        config = LlamaConfig(**(dataclasses.asdict(config) | {"dtype": dtype, "rope_scaling": config.rope_scaling}))
    with Progress(len(names), f"loading {path_or_hub_id}") as progress:
        model = llama_from_hf_state_dict(config, _StreamingStateDict(source, names, progress, row_block_bytes), mesh=mesh)
    return model, folder if has_tokenizer(folder) else None


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


def write_hf_config(folder: Path, config: LlamaConfig, dtype: str, tokenizer_dir: Path | None) -> None:
    """``config.json`` of the model (with the tokenizer's special token ids) and the tokenizer
    files of ``tokenizer_dir`` (None: none) in ``folder``: what transformers and torchtitan read
    beside the weights."""
    hf_config = hf_config_dict(config, dtype) | special_token_ids(tokenizer_dir)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)
