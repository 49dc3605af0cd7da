"""The Flax Llama against transformers' LlamaForCausalLM with the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import flax_twin, hf_logits, random_hf_model, random_tokens, relative_error, tiny_hf_config

from jaxflip.models import KVCache


@pytest.mark.parametrize("tie, bias", [(False, False), (True, True)], ids=["untied", "tied-with-biases"])
def test_float32_logits_match_hf(tie, bias):
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(tie=tie, bias=bias), rng)
    model = flax_twin(hf_model)
    assert (model.lm_head is None) == tie
    tokens = random_tokens(rng, hf_model.config, (3, 40))  # past original_max_position_embeddings / 2

    ours = np.asarray(model(jnp.asarray(tokens)))
    reference = hf_logits(hf_model, tokens)

    assert ours.dtype == np.float32
    assert relative_error(ours, reference) < 1e-4
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_bfloat16_round_trip_and_logits_match_hf():
    """bf16 HF weights load bit for bit; bf16 logits agree with HF's bf16 logits within bf16
    rounding, and are as close as HF's to a float32 computation with the same weights."""
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng).to(torch.bfloat16)
    model = flax_twin(hf_model, param_dtype="bfloat16")
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in state:
        hf_tensor = hf_model.state_dict()[".".join(map(str, path))]
        assert variable[...].dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(variable[...]).view(np.uint16), hf_tensor.view(torch.int16).numpy().view(np.uint16))
    tokens = random_tokens(rng, hf_model.config, (2, 24))

    ours = model(jnp.asarray(tokens))
    reference = hf_logits(hf_model, tokens)
    exact = hf_logits(hf_model.float(), tokens)

    assert ours.dtype == jnp.bfloat16
    ours = ours.astype(jnp.float32)
    assert relative_error(ours, reference) < 3e-2
    assert relative_error(ours, exact) < 1.25 * relative_error(reference, exact)


def test_float32_parameters_with_bfloat16_compute():
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    model = flax_twin(hf_model, param_dtype="float32", dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight[...].dtype == jnp.float32
    tokens = random_tokens(rng, hf_model.config, (2, 24))

    ours = model(jnp.asarray(tokens))

    assert ours.dtype == jnp.bfloat16
    assert relative_error(ours.astype(jnp.float32), hf_logits(hf_model, tokens)) < 3e-2


def test_cached_decoding_matches_full_forward():
    rng = np.random.default_rng()
    model = flax_twin(random_hf_model(tiny_hf_config(), rng))
    tokens = jnp.asarray(random_tokens(rng, model.config, (2, 12)))
    full = np.asarray(model(tokens))

    prompt = 5
    step = nnx.jit(lambda model, ids, cache: model(ids, cache=cache))
    logits, cache = step(model, tokens[:, :prompt], KVCache.init(model.config, 2, 16))
    np.testing.assert_allclose(logits, full[:, :prompt], rtol=1e-5, atol=1e-5)
    for position in range(prompt, tokens.shape[1]):
        logits, cache = step(model, tokens[:, position:position + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, position], rtol=1e-5, atol=1e-5)
    assert int(cache.length) == tokens.shape[1]
