"""The torch bridge against mase-triton (its Triton kernels on CPU through the interpreter):
the layer over consecutive calls, and the rule transform of a whole HF model."""

import mase_reference
import numpy as np
import pytest
import torch
from hf_models import random_hf_model, random_tokens, tiny_hf_config
from mase_triton.random_bitflip.layers import RandomBitFlipLinear as MaseLinear

from jaxflip.torch_bridge import RandomBitFlipLinear, transform_model
from jaxflip.torch_bridge.functional import to_jax, to_torch

mase_reference.install_cpu_kernels()

IN, OUT = 32, 48
BOTH_FLIPPED = dict(x_p_exp=0.5**5, x_p_frac=0.5**3, x_zero_out_t=100.0, w_p_exp=0.5**6, w_p_frac=0.5**4,
                    w_zero_out_t=0.5, x_seed_exp=7, x_seed_frac=0, w_seed_exp=3, w_seed_frac=9)
X_ONLY_NO_ZERO_OUT = dict(x_p_exp=0.5**9, x_p_frac=0.5**2, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                          w_zero_out_t=None, w_seed_exp=11)
W_ZERO_OUT_ONLY = dict(x_p_exp=None, x_p_frac=None, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                       w_zero_out_t=0.05, x_seed_exp=5, x_seed_frac=6)
SEED_NAMES = ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac")


def seeds(layer) -> tuple[int, ...]:
    return tuple(getattr(layer, name) for name in SEED_NAMES)


@pytest.mark.parametrize("settings, dtype", [
    (BOTH_FLIPPED, torch.float32), (BOTH_FLIPPED, torch.bfloat16), (X_ONLY_NO_ZERO_OUT, torch.float32),
    (W_ZERO_OUT_ONLY, torch.float32),
], ids=["both-flipped", "both-flipped-bf16", "x-only-no-zero-out", "w-zero-out-only"])
def test_layer_matches_mase_over_three_calls(settings, dtype):
    rng = np.random.default_rng()
    linear = torch.nn.Linear(IN, OUT, bias=True, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(rng.standard_normal((OUT, IN)).astype(np.float32) * 0.2))
        linear.bias.copy_(torch.from_numpy(rng.standard_normal(OUT).astype(np.float32)))
    mase = MaseLinear.from_linear(linear, **settings)
    ours = RandomBitFlipLinear.from_linear(linear, **settings)
    for call in range(3):
        x = torch.from_numpy(rng.standard_normal((4, 8, IN)).astype(np.float32)).to(dtype)
        grad_y = torch.from_numpy(rng.standard_normal((4, 8, OUT)).astype(np.float32)).to(dtype)
        outputs, grads = [], []
        for layer in (mase, ours):
            layer.zero_grad()
            x_leaf = x.clone().requires_grad_(True)
            y = layer(x_leaf)
            (y * grad_y).sum().backward()
            outputs.append(y.detach())
            grads.append((x_leaf.grad, layer.weight.grad, layer.bias.grad))
        # the same flipped bits go through the same torch matmul: equal, not just close
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0, equal_nan=True)
        for ours_grad, mase_grad in zip(grads[1], grads[0]):
            torch.testing.assert_close(ours_grad, mase_grad, rtol=0, atol=0, equal_nan=True)
        assert seeds(ours) == seeds(mase), f"call {call}"
    assert not torch.allclose(outputs[1], linear(x).detach(), rtol=1e-4), "the settings should change the output"


def test_dlpack_shares_memory_both_ways():
    tensor = torch.randn(16, 8, dtype=torch.bfloat16)
    array = to_jax(tensor)
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    assert to_torch(array).data_ptr() == tensor.data_ptr()


def test_transform_flips_the_layers_mase_would_with_the_same_logits():
    """Our transform against the NewComputeBench transform with mase-triton's layers."""
    from mase_reference import newcomputebench_transform
    from test_model_bitflip_parity import RULES

    rng = np.random.default_rng()
    config = tiny_hf_config()
    reference = random_hf_model(config, rng)
    ours = random_hf_model(config, rng)
    ours.load_state_dict(reference.state_dict())
    mase_layers = newcomputebench_transform(reference, RULES)
    table = transform_model(ours, RULES)
    assert sorted(row.layer for row in table if row.flipped) == sorted(mase_layers)
    modules = dict(ours.named_modules())
    for call in range(2):
        tokens = torch.from_numpy(random_tokens(rng, config, (2, 8)))
        with torch.no_grad():
            expected, got = reference(tokens).logits, ours(tokens).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), equal_nan=True)
        for name, layer in mase_layers.items():
            assert seeds(modules[name]) == seeds(layer), f"call {call}: {name}"
