"""generate: greedy decoding with the KV cache picks what HF's full forward ranks first."""

import jax.numpy as jnp
import numpy as np
import torch
from hf_models import flax_twin, random_hf_model, random_tokens, tiny_hf_config

from jaxflip.models import generate


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


def test_prompts_of_one_bucket_compile_the_prefill_and_the_step_once():
    from jaxflip.bitflip import apply_bitflip_rules
    from jaxflip.compile_count import CompileCount

    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    model = flax_twin(hf_model)
    apply_bitflip_rules(model, {r"model\.layers\.1\.mlp\.down_proj": dict(x_p_exp=0.5**8, w_p_exp=0.5**8)})
    with CompileCount() as compiles:
        for length in (3, 7, 5, 11):  # all in the bucket of 16
            generate(model, random_tokens(rng, hf_model.config, (1, length)), max_new_tokens=4)
    assert compiles.of("_forward_cached") == 2, compiles
