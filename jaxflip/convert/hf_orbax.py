"""``hf-to-orbax`` and ``orbax-to-hf``: an HF transformers Llama folder (or hub id) to a
jaxflip checkpoint and back, one tensor at a time, written aside and renamed into place."""

from __future__ import annotations

import json
import os

from jaxflip.models.checkpoint_folder import copy_tokenizer_files, has_tokenizer, write_aside
from jaxflip.models.hf_io import hf_config_dict, open_hf, special_token_ids
from jaxflip.models.orbax_io import DEFAULT_SHARD_BYTES, CheckpointSource, CheckpointWriter, tokenizer_path
from jaxflip.models.safetensors_io import SafetensorsShardWriter
from jaxflip.models.tensor_io import Progress, resolve_dtype


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
