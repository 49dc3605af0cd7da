"""Greedy generation with a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflip.models.llama import KVCache, LlamaForCausalLM


@nnx.jit
def _forward_cached(model: LlamaForCausalLM, input_ids: jax.Array, cache: KVCache):
    return model(input_ids, cache=cache)


def generate(model: LlamaForCausalLM, input_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """Append ``max_new_tokens`` greedy tokens to the prompts ``input_ids`` (B, T), all of the
    same length; returns (B, T + max_new_tokens). One forward of the prompt fills the cache,
    then one step per token (two compilations). Active bitflips flip at every step, and the
    seeds advance with each one."""
    batch_size, prompt_length = input_ids.shape
    cache = KVCache.init(model.config, batch_size, prompt_length + max_new_tokens)
    logits, cache = _forward_cached(model, input_ids, cache)
    tokens = [input_ids]
    for step in range(max_new_tokens):
        next_token = jnp.argmax(logits[:, -1], axis=-1).astype(input_ids.dtype)[:, None]
        tokens.append(next_token)
        if step + 1 < max_new_tokens:
            logits, cache = _forward_cached(model, next_token, cache)
    return jnp.concatenate(tokens, axis=1)
