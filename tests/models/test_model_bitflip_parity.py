"""A whole model under bitflip rules against the HF model transformed the NewComputeBench way
(every selected nn.Linear replaced by mase-triton's RandomBitFlipLinear.from_linear, its
kernels run by the Triton interpreter), with the same rules and seeds."""

import jax.numpy as jnp
import mase_reference
import numpy as np
from flax import nnx
from hf_models import flax_twin, hf_logits, random_hf_model, random_tokens, tiny_hf_config
from mase_reference import MODEL_RULES as RULES
from mase_reference import newcomputebench_transform

from jaxflip.bitflip import apply_bitflip_rules, named_linears

mase_reference.install_cpu_kernels()


def test_model_with_rules_matches_hf_with_mase_layers_over_two_calls():
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    model = flax_twin(hf_model)
    clean_model = flax_twin(hf_model)
    hf_model.to(mase_reference.device())  # mase-triton's kernels run where the tensors are
    mase_layers = newcomputebench_transform(hf_model, RULES)
    table = apply_bitflip_rules(model, RULES)
    assert sorted(row.layer for row in table if row.flipped) == sorted(mase_layers)
    forward = nnx.jit(lambda model, tokens: model(tokens))

    for call in range(2):
        tokens = random_tokens(rng, hf_model.config, (2, 8))
        ours = np.asarray(forward(model, jnp.asarray(tokens)))
        reference = hf_logits(hf_model, tokens)

        scale = np.abs(reference[np.isfinite(reference)]).max()
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)  # NaN == NaN if any
        assert not np.allclose(ours, clean_model(jnp.asarray(tokens)), rtol=1e-3), "the flips should show"
        linears = named_linears(model)
        for name, layer in mase_layers.items():
            mase_seeds = (layer.x_seed_exp, layer.x_seed_frac, layer.w_seed_exp, layer.w_seed_frac)
            assert linears[name].seeds() == mase_seeds, f"call {call}: {name}"
