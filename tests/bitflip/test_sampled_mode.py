"""Sampled flips through the layers and configs: ``[bitflip] exact = false`` arms every flipped
Linear for the sampled generator, whose layer output is the op's sampled flips of its input and
weight; the torch bridge's ``exact=False`` gives the JAX op's bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxflip.bitflip import Armed, BitFlipLinear, BitflipConfig, TensorFlip, named_linears
from jaxflip.kernels_pallas import random_bitflip
from jaxflip.torch_bridge import RandomBitFlipLinear, random_bitflip_fn


def test_exact_must_be_a_bool_and_the_error_names_the_field():
    with pytest.raises(ValueError, match="bitflip.exact must be true or false"):
        BitflipConfig(x_p_exp=0.5**8, exact="no")


def test_a_sampled_linear_flips_its_input_and_weight_with_the_ops_sampled_flips():
    rng = np.random.default_rng()
    linear = BitFlipLinear(48, 40, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    seeds = tuple(int(s) for s in rng.integers(0, 2**30, 4))
    x_flip, w_flip = TensorFlip(4, 6, 50.0), TensorFlip(5, 3, 1.0)
    linear.configure(x_flip, w_flip, seeds, exact=False)
    assert linear.x_armed == Armed(True, True, exact=False) and linear.w_armed == Armed(True, True, exact=False)
    y = linear(x)
    flipped_x = random_bitflip(x, 4, 6, seeds[0], seeds[1], 50.0, exact=False)[0]
    flipped_w = random_bitflip(linear.weight[...], 5, 3, seeds[2], seeds[3], 1.0, exact=False)[0]
    # the same flipped operands; the products differ only in float32 summation order
    np.testing.assert_allclose(np.asarray(y), np.asarray(flipped_x @ flipped_w.T), rtol=1e-5, atol=1e-6)
    exact = BitFlipLinear(48, 40, rngs=nnx.Rngs(0))
    exact.weight.set_value(linear.weight.get_value())
    exact.configure(x_flip, w_flip, seeds)
    assert not np.array_equal(np.asarray(exact(x)), np.asarray(y))


def test_one_tensor_cannot_be_armed_for_both_modes():
    with pytest.raises(ValueError, match="both exact and sampled"):
        Armed(True, False) | Armed(True, False, exact=False)


class TwoLinears(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = BitFlipLinear(8, 16, rngs=rngs)
        self.lm_head = BitFlipLinear(16, 8, rngs=rngs)


def test_the_config_arms_every_flipped_linear_for_sampled_flips():
    model = TwoLinears(nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    table = BitflipConfig(x_p_exp=0.5**10, w_p_frac=0.5**12, exact=False).apply(model)
    linears = named_linears(model)
    flipped = [row.layer for row in table if row.flipped]
    assert flipped == ["up_proj"]  # the LM head stays clean, as in exact mode
    assert linears["up_proj"].x_armed == Armed(True, False, exact=False)
    assert linears["up_proj"].w_armed == Armed(True, False, exact=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_bridge_gives_the_jax_ops_sampled_bits(dtype):
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal((64, 96)).astype(np.float32)).to(dtype)
    seeds = tuple(int(s) for s in rng.integers(0, 2**30, 2))
    y, *next_seeds = random_bitflip_fn(x, 3, 5, *seeds, 8.0, exact=False)
    want, *want_seeds = random_bitflip(jax.dlpack.from_dlpack(x), 3, 5, *seeds, 8.0, exact=False)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    np.testing.assert_array_equal(y.view(bits).numpy(), torch.from_dlpack(want).view(bits).numpy())
    assert next_seeds == list(want_seeds)


def test_a_sampled_torch_layer_trains_with_the_straight_through_gradient():
    rng = np.random.default_rng()
    linear = torch.nn.Linear(32, 16)
    layer = RandomBitFlipLinear.from_linear(linear, x_p_exp=0.5**3, x_zero_out_t=2.0, w_p_frac=0.5**4,
                                            x_seed_exp=int(rng.integers(2**30)), exact=False)
    x = torch.from_numpy(rng.standard_normal((8, 32)).astype(np.float32)).requires_grad_()
    layer(x).sum().backward()
    assert layer.exact is False and x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad == 0).any() and (x.grad != 0).any()  # the zero-out masked some inputs, not all
