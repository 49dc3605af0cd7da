"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streamed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflip.models.llama import KVCache, LlamaForCausalLM
from jaxflip.models.sharding import mesh_context, model_mesh, place_state

SHORTEST_BUCKET = 16


def bucket_length(length: int, cap: int | None = None) -> int:
    """The padded length that ``length`` tokens compile as: the next power of two, at least
    ``SHORTEST_BUCKET`` and at most ``cap`` (never below ``length``). Lengths up to 2048 then
    compile at most 8 programs (16, 32, ..., 2048) instead of one per length."""
    bucket = max(SHORTEST_BUCKET, 1 << (length - 1).bit_length())
    return max(length, min(bucket, cap)) if cap is not None else bucket


@nnx.jit
def _forward_cached(model: LlamaForCausalLM, input_ids: jax.Array, cache: KVCache, real_length: jax.Array):
    """The next-token logits (B, V) after the first ``real_length`` tokens of ``input_ids``
    (the rest pad it to its bucket), and the cache holding exactly those positions: the
    padding's keys and values lie beyond the cache's length, where attention masks them
    and the next tokens overwrite them."""
    logits, cache = model(input_ids, cache=cache)
    last = jax.lax.dynamic_index_in_dim(logits, real_length - 1, axis=1, keepdims=False)
    return last, cache._replace(length=cache.length - input_ids.shape[1] + real_length)


@partial(jax.jit, static_argnames=("do_sample", "top_k"))
def sample_next_token(logits: jax.Array, key: jax.Array, *, do_sample: bool, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float = 1.0) -> jax.Array:
    """One token per row of ``logits`` (B, V): the argmax, or a sample from the softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens and then to the
    smallest set whose probability reaches ``top_p`` (HF's order of the three)."""
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    probabilities = jax.nn.softmax(descending, axis=-1)
    # a token stays while the tokens above it hold less than top_p; the most likely always stays
    mass_above = jnp.cumsum(probabilities, axis=-1) - probabilities
    kept = jnp.where(mass_above < top_p, descending, jnp.inf)
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: LlamaForCausalLM, input_ids: jax.Array | np.ndarray, max_new_tokens: int, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             seed: int = 0, eos_token_id: int | None = None,
             on_tokens: Callable[[np.ndarray], bool | None] | None = None) -> jax.Array:
    """Append up to ``max_new_tokens`` tokens to the prompts ``input_ids`` (B, T, on the host or
    the device), all of the same length; returns (B, T + generated).

    Greedy unless ``do_sample`` (then ``temperature``, ``top_k``, ``top_p``; the same ``seed``
    gives the same text). With ``eos_token_id``, generation stops once every row has produced
    it, and finished rows repeat it. ``on_tokens`` receives each step's (B,) tokens as they
    come (to stream them); a true return value stops generation there. One forward of the
    prompt fills the cache, then one step per token. Active bitflips flip at every step, and
    the seeds advance with each one.

    Compiles once per prompt bucket and cache bucket (``bucket_length``: the prompt is
    right-padded to its bucket, the cache holds a bucket of positions), not per prompt
    length. Flips are keyed on each element's row-major index, so a single prompt (the
    ``generate`` command, lm-eval) sees the flips its unpadded forward would; with several
    rows, the rows after the first flip at the positions of the padded layout.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in 1..{model.config.vocab_size}, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch_size, prompt_length = input_ids.shape
    prompt = np.asarray(input_ids)
    padded = np.pad(prompt, ((0, 0), (0, bucket_length(prompt_length) - prompt_length)))
    cache = KVCache.init(model.config, batch_size, bucket_length(max(padded.shape[1], prompt_length + max_new_tokens)))
    mesh = model_mesh(model)
    place_state(model)
    with mesh_context(mesh):
        logits, cache = _forward_cached(model, jax.device_put(padded), cache, np.int32(prompt_length))
    key = jax.random.key(seed)
    finished = np.zeros(batch_size, bool)
    tokens = [prompt]
    for step in range(max_new_tokens):
        key, step_key = jax.random.split(key)
        next_token = np.asarray(sample_next_token(logits, step_key, do_sample=do_sample,
                                                  temperature=temperature, top_k=top_k, top_p=top_p))
        if eos_token_id is not None:
            next_token = np.where(finished, eos_token_id, next_token)
            finished |= next_token == eos_token_id
        tokens.append(next_token.astype(prompt.dtype)[:, None])
        stop = on_tokens is not None and on_tokens(next_token)
        if stop or finished.all() or step + 1 == max_new_tokens:
            break
        with mesh_context(mesh):
            logits, cache = _forward_cached(model, jax.device_put(tokens[-1]), cache, np.int32(1))
    # joined on the host, and put with device_put: a concatenation on the device, or jnp.asarray of
    # a host array, compiles a program per shape
    return jax.device_put(np.concatenate(tokens, axis=1))
