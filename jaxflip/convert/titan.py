"""torchtitan Llama checkpoints: read (``titan-to-orbax``) and write (``orbax-to-titan``).

A torchtitan checkpoint is a ``torch.distributed.checkpoint`` (DCP) folder (``.metadata`` and
``__R_0.distcp`` files, e.g. ``outputs/checkpoint/step-1000``) or a ``torch.save`` file of its
state dict (alone or as ``{"model": state_dict}``). Two key namings are in use:

    HF / jaxflip                          torchtitan 0.3                         NewComputeBench (older torchtitan)
    model.embed_tokens.weight             tok_embeddings.weight                  tok_embeddings.weight
    model.layers.N.self_attn.q_proj.weight layers.N.attention.qkv_linear.wq.weight layers.N.attention.wq.weight
    (k_proj, v_proj: wk, wv; o_proj: layers.N.attention.wo.weight in both)
    model.layers.N.mlp.{gate,down,up}_proj layers.N.feed_forward.{w1,w2,w3}      (same)
    model.layers.N.input_layernorm        layers.N.attention_norm                (same)
    model.layers.N.post_attention_layernorm layers.N.ffn_norm                    (same)
    model.norm.weight                     norm.weight                            norm.weight
    lm_head.weight                        lm_head.weight                         output.weight

Both are read; ``orbax-to-titan`` writes either. Training checkpoints also hold optimizer,
scheduler, data-loader and step state (ignored here), and older torchtitan prefixed the model
keys with ``model.``.

RoPE: torchtitan rotates interleaved pairs (2i, 2i+1) of each head (complex multiplication),
HF and jaxflip rotate halves (i, i + H/2). The same attention results from reordering the rows
of q_proj and k_proj within each head, which is what HF's conversion script (and
NewComputeBench's torchtitan-to-HF conversion, and torchtitan's own state-dict adapter) does.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np

from jaxflip.convert.common import (CheckpointSource, ConversionError, Progress, TensorSource, TorchFileSource,
                                    load_torch_file, numpy_dtype, numpy_to_torch, resolve_dtype, torch_to_numpy)
from jaxflip.convert.hf import has_tokenizer, hf_config_dict, special_token_ids
from jaxflip.models.checkpoint import (DEFAULT_SHARD_BYTES, CheckpointWriter, check_floating, check_params,
                                       copy_tokenizer_files, expected_params, tokenizer_path, write_aside)
from jaxflip.models.config import LlamaConfig, config_from_hf
from jaxflip.models.flavors import FLAVORS, get_flavor

KEY_NAMES = ("torchtitan", "legacy")  # torchtitan 0.3's, and NewComputeBench's older torchtitan's
# HF name (layer index as {}) -> (torchtitan 0.3 name, legacy name)
TITAN_KEYS = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "tok_embeddings.weight"),
    "model.norm.weight": ("norm.weight", "norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight"),
    "model.layers.{}.self_attn.q_proj.weight": ("layers.{}.attention.qkv_linear.wq.weight", "layers.{}.attention.wq.weight"),
    "model.layers.{}.self_attn.k_proj.weight": ("layers.{}.attention.qkv_linear.wk.weight", "layers.{}.attention.wk.weight"),
    "model.layers.{}.self_attn.v_proj.weight": ("layers.{}.attention.qkv_linear.wv.weight", "layers.{}.attention.wv.weight"),
    "model.layers.{}.self_attn.o_proj.weight": ("layers.{}.attention.wo.weight", "layers.{}.attention.wo.weight"),
    "model.layers.{}.mlp.gate_proj.weight": ("layers.{}.feed_forward.w1.weight", "layers.{}.feed_forward.w1.weight"),
    "model.layers.{}.mlp.down_proj.weight": ("layers.{}.feed_forward.w2.weight", "layers.{}.feed_forward.w2.weight"),
    "model.layers.{}.mlp.up_proj.weight": ("layers.{}.feed_forward.w3.weight", "layers.{}.feed_forward.w3.weight"),
    "model.layers.{}.input_layernorm.weight": ("layers.{}.attention_norm.weight", "layers.{}.attention_norm.weight"),
    "model.layers.{}.post_attention_layernorm.weight": ("layers.{}.ffn_norm.weight", "layers.{}.ffn_norm.weight"),
}
# the other entries of a training checkpoint (top-level names), and the older model-key prefix
TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")
OLD_MODEL_PREFIX = "model."

_FROM_TITAN = [(re.compile(re.escape(titan).replace(r"\{\}", r"(\d+)")), hf)
               for hf, names in TITAN_KEYS.items() for titan in set(names)]


@contextlib.contextmanager
def single_process():
    """DCP without a process group: what ``no_dist=True`` asks for, minus its warning that it
    is doing so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def hf_name(titan_name: str) -> str | None:
    """The HF / jaxflip name of a torchtitan key (either naming), or None for an unknown one."""
    for pattern, hf in _FROM_TITAN:
        match = pattern.fullmatch(titan_name)
        if match:
            return hf.format(*match.groups())
    return None


def titan_name(hf: str, key_names: str) -> str:
    """The torchtitan key of an HF / jaxflip name, in the ``key_names`` naming."""
    layer = re.search(r"\.layers\.(\d+)\.", hf)
    template = hf.replace(layer.group(0), ".layers.{}.") if layer else hf
    return TITAN_KEYS[template][KEY_NAMES.index(key_names)].format(*([layer.group(1)] if layer else []))


def rotary_heads(hf: str, config: LlamaConfig) -> int | None:
    """How many heads' rows to reorder for RoPE: q_proj's and k_proj's, else None."""
    if hf.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def interleaved_to_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from torchtitan's order (pairs 2i, 2i+1) to HF's (i, i + H/2)."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).transpose(0, 2, 1, 3).reshape(rows, columns)


def halves_to_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``interleaved_to_halves``."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(0, 2, 1, 3).reshape(rows, columns)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file admitting only what such a file holds: DCP's metadata
    classes, torch dtypes, layouts and ``Size``, paths and a few builtins. A pickle names the
    callables it runs; torch's own reader would run any of them (code in a crafted file)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
               *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
               *(("builtins", name) for name in ("set", "frozenset", "slice", "complex", "bytearray"))}

    def find_class(self, module: str, name: str):
        import torch
        import torch.distributed.checkpoint.metadata as dcp_metadata

        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type) \
                and getattr(dcp_metadata, name).__module__ == module:
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a DCP metadata file does not hold "
                                     f"(refused: unpickling it could run code)")


def read_dcp_metadata(folder: Path):
    """A DCP folder's ``Metadata``, read as ``FileSystemReader.read_metadata`` does but through
    ``MetadataUnpickler``."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        with open(folder / ".metadata", "rb") as file:
            metadata = MetadataUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, ImportError, IndexError,
            KeyError) as error:  # what a corrupt or foreign pickle raises
        raise ConversionError(f"{folder}: cannot read the DCP metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{folder}: the DCP metadata holds a {type(metadata).__name__}, not a Metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class DCPSource(TensorSource):
    """The tensors of a DCP folder, each loaded alone by ``dcp.load`` (which reads that
    tensor's chunks from every rank's file) with the metadata read once."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.metadata = read_dcp_metadata(folder)
        self.folder = folder
        self.entries = {fqn: entry for fqn, entry in self.metadata.state_dict_metadata.items()
                        if isinstance(entry, TensorStorageMetadata)}
        self.shapes = {fqn: tuple(entry.size) for fqn, entry in self.entries.items()}
        self.dtypes = {fqn: numpy_dtype(entry.properties.dtype) for fqn, entry in self.entries.items()}

    def read(self, name: str) -> np.ndarray:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        metadata = self.metadata

        class CachedMetadataReader(dcp.FileSystemReader):
            def read_metadata(self):
                return metadata

        entry = self.entries[name]
        tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        try:
            with single_process():
                dcp.load({name: tensor}, storage_reader=CachedMetadataReader(self.folder), no_dist=True)
        # a truncated or missing .distcp fails inside DCP's reader, as a CheckpointException (a BaseException)
        except (Exception, CheckpointException) as error:  # noqa: BLE001
            lines = str(error).strip().splitlines()
            raise ConversionError(f"{self.folder}: cannot read {name} ({type(error).__name__}: "
                                  f"{lines[-1] if lines else ''})") from None
        return torch_to_numpy(tensor)


class RenamedSource(TensorSource):
    """``source`` with its names mapped by ``renames`` (new -> old); only those are kept."""

    def __init__(self, source: TensorSource, renames: dict[str, str]):
        self.source, self.renames = source, renames
        self.shapes = {new: source.shapes[old] for new, old in renames.items()}
        self.dtypes = {new: source.dtypes[old] for new, old in renames.items()}

    def read(self, name: str) -> np.ndarray:
        return self.source.read(self.renames[name])


def open_titan(src: str | os.PathLike) -> TensorSource:
    """A torchtitan checkpoint's model tensors under their torchtitan names (the older
    ``model.`` prefix removed, training state left out)."""
    path = Path(src)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            steps = sorted(path.glob("step-*"), key=lambda step: int(step.name[5:]) if step.name[5:].isdigit() else -1)
            hint = f" (pass a step folder, e.g. {steps[-1]})" if steps else ""
            raise ConversionError(f"{path}: not a DCP checkpoint folder (no .metadata){hint}")
        source = DCPSource(path)
    elif path.is_file():
        state = load_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
        source = TorchFileSource([{name: value for name, value in state.items() if hasattr(value, "shape")}])
    else:
        raise ConversionError(f"{path}: no such file or folder")
    renames = {}
    for name in source.shapes:
        if name.split(".")[0] in TRAINING_STATE:
            continue
        renames[name.removeprefix(OLD_MODEL_PREFIX) if hf_name(name) is None else name] = name
    return RenamedSource(source, renames)


def flavor_from_shapes(shapes: dict[str, tuple]) -> str:
    """The one flavor whose shapes these are (HF names): widths, depth, q and kv widths, tied
    head or not. The vocabulary is not compared: torchtitan takes it from the tokenizer, and
    ``titan_to_orbax`` takes it from the embedding."""
    try:
        vocab, hidden = shapes["model.embed_tokens.weight"]
        found = (vocab, hidden, shapes["model.layers.0.mlp.gate_proj.weight"][0],
                 sum(name.endswith("self_attn.q_proj.weight") for name in shapes),
                 shapes["model.layers.0.self_attn.q_proj.weight"][0], shapes["model.layers.0.self_attn.k_proj.weight"][0],
                 "lm_head.weight" not in shapes)
    except KeyError as error:
        raise ConversionError(f"cannot tell the flavor: no {error.args[0]} among the tensors; "
                              f"pass --flavor or --config") from None
    matches = [name for name, c in FLAVORS.items()
               if (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads * c.head_dim,
                   c.num_key_value_heads * c.head_dim, c.tie_word_embeddings) == found[1:]]
    if len(matches) != 1:
        what = f"several flavors ({', '.join(matches)})" if matches else "no known flavor"
        raise ConversionError(f"the shapes (vocab {vocab}, dim {hidden}, {found[3]} layers, ffn {found[2]}) match {what}; "
                              f"pass --flavor or --config")
    return matches[0]


def titan_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, flavor: str | None = None,
                   config: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None,
                   dtype: str = "keep", overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Convert a torchtitan checkpoint into a jaxflip checkpoint at ``dst``. The model is the
    named ``flavor``, or the HF ``config.json`` at ``config``, or the ``config.json`` beside the
    DCP files (``orbax_to_titan`` writes one), or else the one flavor with these shapes; with a
    flavor, the vocabulary is the embedding's (torchtitan's comes from its tokenizer).
    ``tokenizer_dir``: tokenizer files to bundle (default: those beside the DCP files, if any).
    Returns the summary line."""
    if flavor is not None and config is not None:
        raise ConversionError("pass --flavor or --config, not both")
    beside = Path(src) if Path(src).is_dir() else None
    if config is None and flavor is None and beside is not None and (beside / "config.json").is_file():
        config = beside / "config.json"
    if tokenizer_dir is None and beside is not None and has_tokenizer(beside):
        tokenizer_dir = beside
    source = open_titan(src)
    # an unknown key keeps its torchtitan name, so that the shape check reports it
    titan_names = {hf_name(name) or name: name for name in source.shapes}
    shapes = {hf: source.shapes[name] for hf, name in titan_names.items()}
    param_dtype = resolve_dtype(dtype, source.dtypes.values())
    if config is not None:
        try:
            llama = config_from_hf(config, param_dtype=param_dtype)
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise ConversionError(f"{config}: not a usable HF Llama config ({type(error).__name__}: {error})") from None
    else:
        vocab = {"vocab_size": shapes["model.embed_tokens.weight"][0]} if "model.embed_tokens.weight" in shapes else {}
        llama = get_flavor(flavor or flavor_from_shapes(shapes), param_dtype=param_dtype, **vocab)
    if llama.tie_word_embeddings:
        # torchtitan's state dict names the tied head as well; it repeats the embedding
        shapes.pop("lm_head.weight", None)
        titan_names.pop("lm_head.weight", None)
    check_params(src, shapes, expected_params(llama))
    check_floating(src, {hf: source.dtypes[name] for hf, name in titan_names.items()})
    with (Progress(len(titan_names), f"titan-to-orbax {param_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging):
        writer = CheckpointWriter(staging, llama, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)
        for hf, name in titan_names.items():
            array = source.read(name)
            heads = rotary_heads(hf, llama)
            if heads is not None:
                array = interleaved_to_halves(array, heads)
            array = array.astype(param_dtype, copy=False)
            writer.add(hf, array)
            progress.update(array)
        writer.finish()
    return progress.summary()


def orbax_to_titan(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", merge_lora: bool = False,
                   key_names: str = "torchtitan", overwrite: bool = False) -> str:
    """Convert a jaxflip checkpoint into a torchtitan DCP folder of model weights (as
    torchtitan writes them with ``last_save_model_only``), in the ``key_names`` naming
    (``torchtitan``: 0.3, ``legacy``: NewComputeBench's), with the model's HF ``config.json``
    and the checkpoint's tokenizer files beside them, so that ``titan_to_orbax`` (or a
    torchtitan job's ``hf_assets_path``) reads the folder alone. Returns the summary line."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    if key_names not in KEY_NAMES:
        raise ConversionError(f"key names must be one of {', '.join(KEY_NAMES)}, got {key_names!r}")
    source = CheckpointSource(src, merge_lora=merge_lora)
    llama = source.config
    if llama.attention_bias or llama.mlp_bias:
        raise ConversionError(f"{src}: the model has biases, which torchtitan's Llama does not")
    out_dtype = resolve_dtype(dtype, source.dtypes.values())
    hf_names = {titan_name(hf, key_names): hf for hf in source.shapes}
    if llama.tie_word_embeddings:
        # torchtitan's state dict names the tied head too (the same tensor as the embedding)
        hf_names[titan_name("lm_head.weight", key_names)] = "model.embed_tokens.weight"
    torch_dtype = numpy_to_torch(np.zeros(0, out_dtype)).dtype
    layout = {name: torch.empty(source.shapes[hf], dtype=torch_dtype, device="meta") for name, hf in hf_names.items()}

    def read(name: str):
        hf = hf_names[name]
        array = source.read(hf)
        heads = rotary_heads(hf, llama)
        if heads is not None:
            array = halves_to_interleaved(array, heads)
        array = array.astype(out_dtype, copy=False)
        progress.update(array)
        return numpy_to_torch(array)

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from the shapes alone (meta tensors); each tensor is read when DCP writes it."""

        def resolve_data(self, write_item):
            return read(write_item.index.fqn)

    with (Progress(len(hf_names), f"orbax-to-titan {out_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging, single_process()):
        # one file per tensor: DCP's writer keeps every tensor of a file alive until the file is closed
        writer = dcp.FileSystemWriter(staging, single_file_per_rank=False, thread_count=1)
        dcp.save(layout, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
        hf_config = hf_config_dict(llama, out_dtype) | special_token_ids(tokenizer_path(src))
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer_path(src) is not None:
            copy_tokenizer_files(tokenizer_path(src), staging)
    return progress.summary()
