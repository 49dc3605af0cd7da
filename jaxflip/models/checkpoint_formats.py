"""Which format a model path holds, and the model in it: ``open_checkpoint`` opens a jaxflip
(Orbax) checkpoint or an HF model (folder or hub id), for eval and training alike."""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from jaxflip.models.hf_io import load_hf_model
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.orbax_io import is_checkpoint, load, tokenizer_path


def open_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, param_dtype: str | None = None,
                    dtype: str | None = None) -> tuple[LlamaForCausalLM, Path | None]:
    """The model at ``path`` (a jaxflip checkpoint, an HF folder or an HF hub id) and its
    tokenizer folder (None without one). ``mesh``: place each parameter in its FSDP shard.
    ``param_dtype``: None keeps the stored dtype; ``dtype``: the compute dtype (None:
    ``param_dtype``)."""
    if is_checkpoint(path):
        return load(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype), tokenizer_path(path)
    return load_hf_model(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype)
