"""Checkpoint conversion between HF transformers, torchtitan and the jaxflip (Orbax) checkpoint.

    python -m jaxflip.convert hf-to-orbax    SRC DST   # HF folder or hub id -> jaxflip
    python -m jaxflip.convert orbax-to-hf    SRC DST   # jaxflip -> HF folder (--merge-lora)
    python -m jaxflip.convert titan-to-orbax SRC DST   # torchtitan DCP folder / torch.save file -> jaxflip
    python -m jaxflip.convert orbax-to-titan SRC DST   # jaxflip -> torchtitan DCP folder

Every conversion streams tensor by tensor and writes DST aside, renaming it into place at
the end. In Python: ``open_checkpoint`` opens a jaxflip checkpoint or an HF model for eval or
training; ``jaxflip.convert.hf`` and ``jaxflip.convert.titan`` hold the conversions.
"""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from jaxflip.convert.common import ConversionError
from jaxflip.convert.hf import load_hf_model
from jaxflip.models.checkpoint import is_checkpoint, load, tokenizer_path
from jaxflip.models.llama import LlamaForCausalLM


def open_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, param_dtype: str | None = None,
                    dtype: str | None = None) -> tuple[LlamaForCausalLM, Path | None]:
    """The model at ``path`` (a jaxflip checkpoint, an HF folder or an HF hub id) and its
    tokenizer folder (None without one). ``mesh``: place each parameter in its FSDP shard.
    ``param_dtype``: None keeps the stored dtype; ``dtype``: the compute dtype (None:
    ``param_dtype``)."""
    if is_checkpoint(path):
        return load(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype), tokenizer_path(path)
    return load_hf_model(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype)


__all__ = ["ConversionError", "load_hf_model", "open_checkpoint"]
