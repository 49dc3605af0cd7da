"""Llama model configuration, with HF ``LlamaConfig`` field names so a ``config.json`` maps 1:1."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's RoPE frequency scaling (HF ``rope_type: "llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048  # the default KV-cache length of ``generate``
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    param_dtype: str = "float32"  # dtype the parameters are stored in
    dtype: str | None = None  # dtype of activations and matmuls; None: param_dtype
    attention_implementation: str | None = None  # "xla", "cudnn"; None: see llama.py

    def __post_init__(self):
        # derived defaults are filled in here, so build a changed config with LlamaConfig(...)
        # (or get_flavor(name, **changes)), not dataclasses.replace, which would keep them
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.param_dtype)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.attention_implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_implementation must be None, 'xla' or 'cudnn', got {self.attention_implementation!r}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def config_from_hf(hf_config, *, param_dtype: str = "float32", dtype: str | None = None) -> LlamaConfig:
    """A ``LlamaConfig`` from an HF Llama config: a ``config.json`` path (or its folder), a dict,
    or a ``transformers.LlamaConfig``. Reads both the transformers-4 (``rope_theta`` +
    ``rope_scaling``) and the transformers-5 (``rope_parameters``) forms."""
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
        with open(path) as f:
            hf_config = json.load(f)
    elif not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only SiLU (SwiGLU) Llama MLPs are supported, got hidden_act={hf_config['hidden_act']!r}")
    rope = dict(hf_config.get("rope_scaling") or {}) | dict(hf_config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported RoPE type {rope_type!r} (supported: default, llama3)")
    heads = hf_config["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim"),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
        rope_scaling=None if rope_type == "default" else Llama3RopeScaling(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        ),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
        attention_bias=hf_config.get("attention_bias", False),
        mlp_bias=hf_config.get("mlp_bias", False),
        param_dtype=param_dtype,
        dtype=dtype,
    )
