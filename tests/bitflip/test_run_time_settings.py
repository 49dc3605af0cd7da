"""Flip settings are run-time state: changing a Linear's halves, zero-out threshold or on/off
within its arming compiles nothing, an armed tensor set off is untouched, and a program armed
for more gives the flips of the program armed for just the setting."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import Armed, BitFlipLinear, TensorFlip, arm_for_tables, match_rules
from jaxflip.compile_count import CompileCount


@nnx.jit
def loss_and_grad(linear, x):
    """The loss and its gradient in ``x`` (through the flips' straight-through, zero-out-masked VJP)."""
    return nnx.value_and_grad(lambda linear, x: jnp.sum(linear(x) ** 2), argnums=1)(linear, x)


def fresh_linear(rng) -> BitFlipLinear:
    return BitFlipLinear(48, 40, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def random_x(rng):
    return jnp.asarray(rng.standard_normal((2, int(rng.integers(5, 50)), 48)) * 4, jnp.float32)


SETTINGS = [TensorFlip(3, 7, 2.5), TensorFlip(16, None, 100.0), TensorFlip(None, 24, 0.5), TensorFlip(1, 1, 1e9)]


def test_new_settings_within_the_arming_compile_nothing_and_flip_as_configured():
    rng = np.random.default_rng()
    linear, x = fresh_linear(rng), random_x(rng)
    linear.arm(Armed(True, True), Armed(True, True))
    results = []
    with CompileCount() as compiles:
        for flip in SETTINGS:
            linear.configure(flip, flip, (5, 6, 7, 8))
            results.append(loss_and_grad(linear, x))
    assert compiles.of("loss_and_grad") == 1, compiles
    assert linear.x_armed == Armed(True, True) and linear.w_armed == Armed(True, True)
    for flip, (loss, grad) in zip(SETTINGS, results):  # against a layer compiled for this setting alone
        alone = fresh_linear(rng)
        alone.weight.set_value(linear.weight.get_value())
        alone.configure(flip, flip, (5, 6, 7, 8))
        assert alone.x_armed == Armed.needed_by(flip)
        want_loss, want_grad = loss_and_grad(alone, x)
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(want_loss), err_msg=str(flip))
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad), err_msg=str(flip))
    assert len({float(loss) for loss, _ in results}) == len(SETTINGS)  # each setting flipped differently


def test_an_armed_tensor_set_off_is_untouched_and_its_seeds_stay():
    rng = np.random.default_rng()
    linear, x = fresh_linear(rng), random_x(rng)
    linear.configure(TensorFlip(2, 2, 1.0), TensorFlip(2, 2, 0.1), (1, 2, 3, 4))
    flipped, _ = loss_and_grad(linear, x)
    linear.configure(TensorFlip(), TensorFlip(), (1, 2, 3, 4))
    assert linear.x_armed == Armed(True, True)  # kept: the setting off needs no new program
    off, grad = loss_and_grad(linear, x)
    clean = BitFlipLinear(48, 40, rngs=nnx.Rngs(0))
    clean.weight.set_value(linear.weight.get_value())
    want, want_grad = loss_and_grad(clean, x)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))
    assert float(flipped) != float(off)
    assert linear.seeds() == (1, 2, 3, 4)


@pytest.mark.parametrize("flip", SETTINGS)
def test_a_setting_reads_back_as_configured(flip):
    linear = BitFlipLinear(4, 4, rngs=nnx.Rngs(0))
    linear.configure(flip, TensorFlip(), (0, 0, 0, 0))
    assert linear.x_flip == flip and linear.w_flip == TensorFlip()


def test_arm_for_tables_arms_the_union_of_what_the_tables_flip():
    layers = ["a", "b", "c"]
    tables = [match_rules(layers, {"a": {"x_p_exp": 0.5**4}}),
              match_rules(layers, {"a": {"w_zero_out_t": 3.0}, "b": {"x_p_frac": 0.5**9, "x_zero_out_t": 1.0}})]

    class Three(nnx.Module):
        def __init__(self):
            self.a, self.b, self.c = (BitFlipLinear(4, 4, rngs=nnx.Rngs(i)) for i in range(3))

    model = Three()
    arm_for_tables(model, tables)
    assert (model.a.x_armed, model.a.w_armed) == (Armed(True, False), Armed(False, True))
    assert (model.b.x_armed, model.b.w_armed) == (Armed(True, True), Armed())
    assert (model.c.x_armed, model.c.w_armed) == (Armed(), Armed())
