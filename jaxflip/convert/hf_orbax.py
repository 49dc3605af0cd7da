"""``hf-to-orbax`` and ``orbax-to-hf``: an HF transformers Llama folder (or hub id) to a
jaxflip checkpoint and back, one tensor at a time, written aside and renamed into place."""

from __future__ import annotations

import os
import sys

from jaxflip.models.checkpoint_folder import has_tokenizer, write_aside
from jaxflip.models.hf_io import open_hf, write_hf_config
from jaxflip.models.orbax_io import DEFAULT_SHARD_BYTES, CheckpointSource, CheckpointWriter, tokenizer_path
from jaxflip.models.safetensors_io import SafetensorsShardWriter
from jaxflip.models.tensor_io import DEFAULT_ROW_BLOCK_BYTES, Progress, resolve_dtype


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, row_block_bytes: int = DEFAULT_ROW_BLOCK_BYTES) -> str:
    """Convert an HF Llama (folder or hub id) into a jaxflip checkpoint at ``dst``, tokenizer
    files included; a tensor larger than ``row_block_bytes`` is read and written a block of
    rows at a time. Returns the summary line."""
    folder, source, config, names = open_hf(src, dtype)
    tokenizer_dir = folder if has_tokenizer(folder) else None
    if tokenizer_dir is None:  # eval then needs --tokenizer
        print(f"note: {src} has no tokenizer files; the checkpoint will have none", file=sys.stderr, flush=True)
    with (Progress(len(names), f"hf-to-orbax {config.param_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging):
        writer = CheckpointWriter(staging, config, tokenizer_dir=tokenizer_dir,
                                  max_shard_bytes=max_shard_bytes, row_block_bytes=row_block_bytes)
        for name in names:
            writer.add_from(source, name)
            progress.update(writer.expected[name])
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
        write_hf_config(staging, source.config, out_dtype, tokenizer_path(src))
    return progress.summary()
