"""The Flax Llama against transformers' LlamaForCausalLM with the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import flax_twin, hf_logits, random_hf_model, random_tokens, relative_error, tiny_hf_config

from jaxflip.models import KVCache, generate, llama_from_hf_state_dict


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


def test_greedy_generation_picks_hf_argmax_at_every_step():
    """Each token we generate is the argmax of HF's logits for the sequence so far (up to a
    float32 near-tie, where the two frameworks may legitimately pick different tokens)."""
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    model = flax_twin(hf_model)
    prompt = random_tokens(rng, hf_model.config, (2, 6))

    ours = np.asarray(generate(model, jnp.asarray(prompt), max_new_tokens=8))
    assert ours.shape == (2, 14) and np.array_equal(ours[:, :6], prompt)
    with torch.no_grad():
        logits = hf_model(torch.from_numpy(ours[:, :-1].copy())).logits.numpy()
    steps = logits[:, 5:]  # the logits that chose tokens 6..13
    chosen = np.take_along_axis(steps, ours[:, 6:, None], axis=-1)[..., 0]
    np.testing.assert_array_less(steps.max(axis=-1) - chosen, 1e-4)


def test_loader_rejects_state_dicts_that_do_not_fit():
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    state_dict = dict(hf_model.state_dict())
    state_dict["model.final_norm"] = state_dict.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['model.final_norm'\]"):
        llama_from_hf_state_dict(hf_model.config, state_dict)
    state_dict = dict(hf_model.state_dict())
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"][:-1]
    with pytest.raises(ValueError, match=r"'lm_head.weight': HF tensor has shape \(95, 64\), the model expects \(96, 64\)"):
        llama_from_hf_state_dict(hf_model.config, state_dict)
