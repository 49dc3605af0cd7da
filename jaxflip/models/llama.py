"""Llama (Llama-3, Llama-3.1 and AICrossSim-CLM) in Flax NNX, laid out like HF transformers.

Module paths equal HF ``LlamaForCausalLM`` state-dict keys (``model.layers.0.self_attn.q_proj``
holds ``weight``), and every Linear is a ``BitFlipLinear`` in torch layout ``(out, in)``: HF
weights copy in unchanged, and bitflip rules are written against HF's layer names. Flips are
off until ``jaxflip.bitflip.apply_bitflip_rules`` turns them on.

Every parameter carries logical axis names (``jaxflip.models.sharding`` maps them to mesh axes),
and activations are constrained by name (``constrain``), so on a mesh every device keeps its
batch rows whatever XLA would have guessed (q, k and v must share one layout for cuDNN's
fused attention to partition).

Shapes: B batch, T query positions, S key positions, D hidden, F MLP hidden, V vocab,
N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflip.bitflip import BitFlipLinear, flip_shared_input
from jaxflip.kernels_pallas.random_bitflip import FLIPPED_NAME, KEEP_NAME
from jaxflip.models.llama_config import LlamaConfig
from jaxflip.models.sharding import constrain, context_sharding

embedding_init = nnx.initializers.normal(stddev=0.02)  # HF Llama's initializer_range
HIDDEN_AXES = ("batch", "length", "activation_embed")  # (B, T, D) between and inside layers
SAVE_FLIPS = jax.checkpoint_policies.save_only_these_names(FLIPPED_NAME, KEEP_NAME)
# "flips": "full" but keeping each flipped tensor and its zero-out mask, so the recomputed
# forward flips nothing again (memory: every flipped input and weight of the layer, plus one
# byte per element of those with zero-out); "dots_flips": "dots" plus the same
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "flips": SAVE_FLIPS,
    "dots_flips": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, SAVE_FLIPS),
}


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE's (H/2,) angular frequencies in float32, with Llama-3.1 scaling when configured
    (long wavelengths slowed by ``factor``, short ones kept, a smooth ramp in between), the
    same float32 arithmetic as HF."""
    head_dim = config.head_dim
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_context = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_context / np.float32(scaling.low_freq_factor)
    high_freq_wavelen = old_context / np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_context / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate (B, T, N, H) by position, HF's rotate-half form (pairs are (i, i + H/2))."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # (T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


class KVCache(NamedTuple):
    """Keys and values of the positions seen so far, per layer (B, S_max, K, H)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array  # int32 scalar: how many positions are filled

    @classmethod
    def init(cls, config: LlamaConfig, batch_size: int, max_length: int) -> KVCache:
        shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
        empty = tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_hidden_layers))
        return cls(empty, empty, jnp.int32(0))


class Embedding(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.dtype = config.jnp_dtype
        self.weight = nnx.Param(
            embedding_init(rngs.params(), (config.vocab_size, config.hidden_size), config.jnp_param_dtype),
            out_sharding=("vocab", "embed"), eager_sharding=False,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.weight[...], input_ids, axis=0).astype(self.dtype), HIDDEN_AXES)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Logits through the transposed embedding (tied LM head)."""
        return jnp.einsum("btd,vd->btv", hidden, self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig):
        self.eps = config.rms_norm_eps
        self.dtype = config.jnp_dtype
        self.weight = nnx.Param(jnp.ones((config.hidden_size,), config.jnp_param_dtype),
                                out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        # the mean square in float32 even for bf16 activations, as HF does
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * normed.astype(x.dtype)).astype(self.dtype)


def _linear(config: LlamaConfig, in_features: int, out_features: int, axes, use_bias: bool, rngs) -> BitFlipLinear:
    # context_sharding: each Linear flips its tensors on their shards of the mesh in context
    return BitFlipLinear(in_features, out_features, use_bias=use_bias, axes=axes, layout=context_sharding,
                         param_dtype=config.jnp_param_dtype, dtype=config.jnp_dtype, rngs=rngs)


def lm_head_linear(config: LlamaConfig, rngs) -> BitFlipLinear:
    """The untied LM head, (V, D)."""
    return _linear(config, config.hidden_size, config.vocab_size, ("vocab", "embed"), False, rngs)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.config = config
        self.q_proj = _linear(config, D, N * H, ("heads", "embed"), bias, rngs)
        self.k_proj = _linear(config, D, K * H, ("kv_heads", "embed"), bias, rngs)
        self.v_proj = _linear(config, D, K * H, ("kv_heads", "embed"), bias, rngs)
        self.o_proj = _linear(config, N * H, D, ("embed", "heads"), bias, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array] | None):
        """Causal self-attention of x (B, T, D) at ``positions`` (T,). With ``cache`` (keys,
        values of all earlier positions), the new keys and values are written at
        ``positions`` and the updated cache is returned with the output."""
        cfg = self.config
        B, T, _ = x.shape
        inv_freq = rope_inverse_frequencies(cfg)
        q_axes = ("batch", "length", "activation_heads", "activation_head_dim")
        kv_axes = ("batch", "length", "activation_kv_heads", "activation_head_dim")
        q_in, k_in, v_in = flip_shared_input(x, (self.q_proj, self.k_proj, self.v_proj))
        q = apply_rope(self.q_proj.project(q_in).reshape(B, T, cfg.num_attention_heads, cfg.head_dim), positions,
                       inv_freq)
        k = apply_rope(self.k_proj.project(k_in).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim), positions,
                       inv_freq)
        v = self.v_proj.project(v_in).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        q, k, v = constrain(q, q_axes), constrain(k, kv_axes), constrain(v, kv_axes)
        if cache is None:
            # GQA: dot_product_attention shares each of the K key/value heads among N / K query heads
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self._implementation())
        else:
            start = (0, positions[0], 0, 0)
            keys = constrain(jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start), kv_axes)
            values = constrain(jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start), kv_axes)
            # each query sees the cached positions up to its own; unfilled slots lie beyond it
            mask = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]  # (T, S)
            out = jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None], implementation="xla")
            cache = (keys, values)
        out = constrain(out.reshape(B, T, cfg.num_attention_heads * cfg.head_dim), ("batch", "length", "activation_heads"))
        return constrain(self.o_proj(out), HIDDEN_AXES), cache

    def _implementation(self) -> str:
        if self.config.attention_implementation is not None:
            return self.config.attention_implementation
        # jax's default (None) is XLA; cuDNN's fused attention is the fast path for 16-bit on GPU
        return "cudnn" if jax.default_backend() == "gpu" and self.config.dtype == "bfloat16" else "xla"


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        D, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, D, F, ("mlp", "embed"), bias, rngs)
        self.up_proj = _linear(config, D, F, ("mlp", "embed"), bias, rngs)
        self.down_proj = _linear(config, F, D, ("embed", "mlp"), bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_in, up_in = flip_shared_input(x, (self.gate_proj, self.up_proj))
        hidden = constrain(jax.nn.silu(self.gate_proj.project(gate_in)) * self.up_proj.project(up_in),
                           ("batch", "length", "activation_mlp"))
        return constrain(self.down_proj(hidden), HIDDEN_AXES)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = LlamaMLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache):
        attended, cache = self.self_attn(self.input_layernorm(x), positions, cache)
        x = constrain(x + attended, HIDDEN_AXES)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN_AXES), cache


class LlamaModel(nnx.Module):
    """The decoder stack without the LM head (HF's ``model.`` prefix)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config)
        self.remat = "none"  # see set_remat

    def set_remat(self, policy: str) -> None:
        """Activation checkpointing of each decoder layer in training: ``none``, ``full`` (keep
        only layer inputs), ``dots`` (also keep matmul outputs), ``flips`` / ``dots_flips``
        (``full`` / ``dots`` also keeping the flipped tensors, so no flip is computed twice).
        The flips are a pure function of the seeds, so a recomputed forward flips exactly what
        the first one did."""
        if policy not in REMAT_POLICIES:
            raise ValueError(f"remat policy must be one of {', '.join(REMAT_POLICIES)}, got {policy!r}")
        self.remat = policy

    def __call__(self, input_ids: jax.Array, cache: KVCache | None = None):
        start = 0 if cache is None else cache.length
        positions = start + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        x = self.embed_tokens(input_ids)
        if not isinstance(self.layers, nnx.List):
            # the train state's stacked layers (jaxflip.models.scan.StackedLayers) scan themselves
            return self.norm(self.layers(x, positions, self.remat)), None
        if cache is None and self.remat != "none":
            checkpointed = nnx.remat(lambda layer, x: layer(x, positions, None), policy=REMAT_POLICIES[self.remat])
            for layer in self.layers:
                x, _ = checkpointed(layer, x)
            return self.norm(x), None
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, None if cache is None else (cache.keys[i], cache.values[i]))
            if cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
        if cache is not None:
            cache = KVCache(tuple(keys), tuple(values), cache.length + input_ids.shape[1])
        return self.norm(x), cache


class LlamaForCausalLM(nnx.Module):
    """``model(input_ids)`` -> logits (B, T, V) in the compute dtype.

    ``model(input_ids, cache=cache)`` -> ``(logits, cache)``: ``input_ids`` continue the
    ``cache.length`` positions already in ``cache`` (see ``KVCache.init`` and ``generate``).
    With tied embeddings there is no ``lm_head`` module: the logits use ``embed_tokens``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else lm_head_linear(config, rngs)

    def __call__(self, input_ids: jax.Array, cache: KVCache | None = None):
        hidden, new_cache = self.model(input_ids, cache)
        logits = self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        logits = constrain(logits, ("batch", "length", "activation_vocab"))
        return logits if cache is None else (logits, new_cache)
