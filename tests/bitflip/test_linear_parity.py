"""BitFlipLinear against mase-triton's RandomBitFlipLinear (its Triton kernels on CPU through
the interpreter): outputs, gradients and seeds over consecutive calls."""

import math

import jax.numpy as jnp
import mase_reference
import numpy as np
import pytest
import torch
from flax import nnx
from mase_triton.random_bitflip.layers import RandomBitFlipLinear

from jaxflip.bitflip import BitFlipLinear, TensorFlip, seed_snapshot

mase_reference.install_cpu_kernels()

IN, OUT = 32, 48
BOTH_FLIPPED = dict(x_p_exp=0.5**5, x_p_frac=0.5**3, x_zero_out_t=100.0, w_p_exp=0.5**6, w_p_frac=0.5**4,
                    w_zero_out_t=0.5, x_seed_exp=7, x_seed_frac=0, w_seed_exp=3, w_seed_frac=9)
# x untouched (its seeds must stay); W only zeroed out, no flips
X_OFF_W_ZERO_OUT = dict(x_p_exp=None, x_p_frac=None, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                        w_zero_out_t=0.05, x_seed_exp=5, x_seed_frac=6)
# x flipped without zero-out (plain straight-through gradient); W untouched
X_ONLY_NO_ZERO_OUT = dict(x_p_exp=0.5**9, x_p_frac=0.5**2, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                          w_zero_out_t=None, w_seed_exp=11)


def configured_pair(settings: dict, rng: np.random.Generator):
    """The mase layer and ours, with the same random weights and bias and the same settings."""
    weight = (rng.standard_normal((OUT, IN)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    mase = RandomBitFlipLinear(IN, OUT, True, mase_reference.device(), torch.float32, **settings)
    with torch.no_grad():
        mase.weight.copy_(mase_reference.to_torch(weight, "float32"))
        mase.bias.copy_(mase_reference.to_torch(bias, "float32"))
    ours = BitFlipLinear(IN, OUT, use_bias=True, rngs=nnx.Rngs(0))
    ours.weight[...] = jnp.asarray(weight)
    ours.bias[...] = jnp.asarray(bias)
    ours.configure(
        TensorFlip.from_probabilities(settings["x_p_exp"], settings["x_p_frac"], settings["x_zero_out_t"]),
        TensorFlip.from_probabilities(settings["w_p_exp"], settings["w_p_frac"], settings["w_zero_out_t"]),
        tuple(settings.get(k, 0) for k in ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac")),
    )
    return mase, ours


def mase_seeds(layer) -> tuple[int, int, int, int]:
    return (layer.x_seed_exp, layer.x_seed_frac, layer.w_seed_exp, layer.w_seed_frac)


def loss_and_output(layer, x, grad_y):
    y = layer(x)
    return jnp.sum(y * grad_y), y


def assert_close(ours, reference, rtol=2e-5):
    """Equal up to float32 matmul rounding; inf and NaN (flips without zero-out) must sit at
    the same positions."""
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.abs(reference[np.isfinite(reference)]).max(initial=1.0)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("settings, mode", [
    (BOTH_FLIPPED, "eager"), (BOTH_FLIPPED, "jit"), (X_OFF_W_ZERO_OUT, "eager"), (X_ONLY_NO_ZERO_OUT, "jit"),
], ids=["both-flipped-eager", "both-flipped-jit", "x-off-w-zero-out", "x-only-no-zero-out"])
def test_bitflip_linear_matches_mase_over_three_calls(settings, mode):
    rng = np.random.default_rng()
    mase, ours = configured_pair(settings, rng)
    step = nnx.value_and_grad(loss_and_output, argnums=(0, 1), has_aux=True)
    if mode == "jit":
        step = nnx.jit(step)
    initial_seeds = ours.seeds()
    flipped_any = False
    for call in range(3):
        x = rng.standard_normal((4, 8, IN)).astype(np.float32)
        grad_y = rng.standard_normal((4, 8, OUT)).astype(np.float32)

        x_torch = mase_reference.to_torch(x, "float32").requires_grad_(True)
        mase.zero_grad()
        y_torch = mase(x_torch)
        (y_torch * mase_reference.to_torch(grad_y, "float32")).sum().backward()

        (_, y), (param_grads, x_grad) = step(ours, jnp.asarray(x), jnp.asarray(grad_y))

        assert_close(y, y_torch.detach().cpu().numpy())
        assert_close(x_grad, x_torch.grad.cpu().numpy())
        assert_close(param_grads["weight"][...], mase.weight.grad.cpu().numpy())
        assert_close(param_grads["bias"][...], mase.bias.grad.cpu().numpy())
        assert ours.seeds() == mase_seeds(mase), f"call {call}"
        flipped_any |= not np.allclose(y, x @ np.asarray(ours.weight[...]).T + np.asarray(ours.bias[...]), rtol=1e-4)

    assert flipped_any, "the settings should change the output"
    if settings["x_p_exp"] is None and settings["x_p_frac"] is None and settings["x_zero_out_t"] is None:
        assert ours.seeds()[:2] == initial_seeds[:2]


def test_one_group_only_flips_that_group_and_advances_only_its_seed():
    """mase-triton's layer cannot launch one group None and the other set; its kernel can
    (``mase_reference.mase_forward``), and that is the referee here."""
    rng = np.random.default_rng()
    x = rng.standard_normal((6, IN)).astype(np.float32)
    weight = rng.standard_normal((OUT, IN)).astype(np.float32)
    layer = BitFlipLinear(IN, OUT, rngs=nnx.Rngs(0))
    layer.weight[...] = jnp.asarray(weight)
    layer.configure(TensorFlip(None, 3, None), TensorFlip(7, None, 8.0), (20, 30, 40, 50))

    y = layer(jnp.asarray(x))

    x_flipped = mase_reference.mase_forward(mase_reference.to_torch(x, "float32"), None, 3, 20, 30, None)
    w_flipped = mase_reference.mase_forward(mase_reference.to_torch(weight, "float32"), 7, None, 40, 50, 8.0)
    assert_close(y, (x_flipped @ w_flipped.T).cpu().numpy())
    assert layer.seeds() == (20, 30 + math.ceil(3 / 4), 40 + math.ceil(7 / 4), 50)


def test_seed_snapshot_rewinds_the_flips():
    rng = np.random.default_rng()
    _, layer = configured_pair(BOTH_FLIPPED, rng)
    x = jnp.asarray(rng.standard_normal((4, IN)).astype(np.float32))
    snapshot = seed_snapshot(layer)
    first = layer(x)
    second = layer(x)
    assert not np.array_equal(first, second), "consecutive calls flip different bits"
    nnx.update(layer, snapshot)
    np.testing.assert_array_equal(layer(x), first)


def test_flips_happen_inside_jit_with_traced_seeds():
    """The seeds are traced inputs of the compiled call: one compilation serves every call,
    and each call still flips differently."""
    rng = np.random.default_rng()
    _, layer = configured_pair(BOTH_FLIPPED, rng)
    x = jnp.asarray(rng.standard_normal((4, IN)).astype(np.float32))
    traces = []

    @nnx.jit
    def forward(layer, x):
        traces.append(None)
        return layer(x)

    outputs = [forward(layer, x) for _ in range(3)]
    assert len(traces) == 1
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])
