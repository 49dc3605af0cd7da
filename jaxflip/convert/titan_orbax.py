"""``titan-to-orbax`` and ``orbax-to-titan``: a torchtitan Llama checkpoint (DCP folder or
``torch.save`` file, either key naming; see ``jaxflip.models.titan_io``) to a jaxflip
checkpoint and back, one tensor at a time, written aside and renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxflip.models.checkpoint_folder import has_tokenizer, write_aside
from jaxflip.models.flavors import get_flavor
from jaxflip.models.hf_io import write_hf_config
from jaxflip.models.llama_config import config_from_hf
from jaxflip.models.named_params import check_floating, check_params, expected_params
from jaxflip.models.orbax_io import DEFAULT_SHARD_BYTES, CheckpointSource, CheckpointWriter, tokenizer_path
from jaxflip.models.tensor_io import ConversionError, Progress, resolve_dtype
from jaxflip.models.titan_io import (KEY_NAMES, flavor_from_shapes, halves_to_interleaved, hf_name, interleaved_to_halves,
                                     open_titan, rotary_heads, titan_name, write_dcp)


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

    def read(name: str) -> np.ndarray:
        hf = hf_names[name]
        array = source.read(hf)
        heads = rotary_heads(hf, llama)
        if heads is not None:
            array = halves_to_interleaved(array, heads)
        array = array.astype(out_dtype, copy=False)
        progress.update(array)
        return array

    with (Progress(len(hf_names), f"orbax-to-titan {out_dtype}") as progress,
          write_aside(dst, overwrite=overwrite) as staging):
        write_dcp(staging, {name: source.shapes[hf] for name, hf in hf_names.items()}, out_dtype, read)
        write_hf_config(staging, llama, out_dtype, tokenizer_path(src))
    return progress.summary()
