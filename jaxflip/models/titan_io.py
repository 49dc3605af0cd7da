"""torchtitan Llama checkpoints: their key names and RoPE row order, a DCP folder or
``torch.save`` file opened as tensors (``open_titan``), the flavor its shapes tell, and a DCP
folder written tensor by tensor (``write_dcp``). The converters ``titan-to-orbax`` and
``orbax-to-titan`` (``jaxflip.convert.titan_orbax``) are built on these.

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
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxflip.models.flavors import FLAVORS
from jaxflip.models.llama_config import LlamaConfig
from jaxflip.models.tensor_io import (ConversionError, TensorSource, TorchFileSource, load_torch_file, numpy_dtype,
                                      numpy_to_torch, torch_to_numpy)

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


def write_dcp(folder: Path, shapes: dict[str, tuple], dtype: str, read: Callable[[str], np.ndarray]) -> None:
    """Write a DCP folder (no process group) of the tensors named in ``shapes``, all of
    ``dtype``: DCP plans from the shapes alone (meta tensors) and asks ``read(name)`` for each
    tensor as it writes it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    torch_dtype = numpy_to_torch(np.zeros(0, dtype)).dtype
    layout = {name: torch.empty(shape, dtype=torch_dtype, device="meta") for name, shape in shapes.items()}

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from the shapes alone (meta tensors); each tensor is read when DCP writes it."""

        def resolve_data(self, write_item):
            return numpy_to_torch(read(write_item.index.fqn))

    with single_process():
        # one file per tensor: DCP's writer keeps every tensor of a file alive until the file is closed
        writer = dcp.FileSystemWriter(folder, single_file_per_rank=False, thread_count=1)
        dcp.save(layout, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
