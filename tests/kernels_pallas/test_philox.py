"""The flip groups of ``philox.flip_bits``: with equal seeds and halves, one Philox stream
for both groups (what the kernel does then) gives the bits of two separate streams.

The tests pass ``lax.mulhi`` as the Philox multiply: exact on CPU, and five times quicker to
compile than the portable 16-bit split (which ``test_random_bitflip.py`` checks against
mase-triton); the grouping does not depend on how the product is formed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxflip.kernels_pallas.philox import BITS_DTYPE, FRAC_MASK, SIGN_EXP_MASK, flip_bits, flip_groups


def mulhilo(a, b):
    return lax.mulhi(jnp.uint32(a), b), jnp.uint32(a) * b


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("halves", [3, 13, 16])  # several calls; at 16 still ~24 exponent flips
def test_one_stream_for_equal_seeds_is_bit_identical_to_two(dtype, halves):
    rng = np.random.default_rng()
    n = 1 << 18
    x = jnp.asarray(rng.standard_normal(n) * 3, jnp.float32).astype(dtype)
    x_bits = jax.lax.bitcast_convert_type(x, BITS_DTYPE[dtype])
    index = jnp.arange(n, dtype=jnp.uint32) + jnp.uint32(int(rng.integers(0, 2**31 - 2**20)))
    seed = jnp.uint32(int(rng.integers(0, 2**31 - 16)))

    @jax.jit
    def flip(x_bits, index, seed):
        return (flip_bits(x_bits, index, seed, seed, halves, halves, dtype, mulhilo),
                flip_bits(x_bits, index, seed, seed, halves, halves, dtype, mulhilo, shared_seed=True))

    separate, shared = flip(x_bits, index, seed)
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(separate))
    changed = np.asarray(separate) ^ np.asarray(x_bits)
    assert (changed & SIGN_EXP_MASK[dtype]).any() and (changed & FRAC_MASK[dtype]).any()


def test_one_stream_is_one_group_with_both_masks():
    assert [(g.mask, g.seed) for g in flip_groups(5, 5, "bfloat16", shared_seed=True)] == [(0xFFFF, 0)]
    assert [(g.mask, g.seed) for g in flip_groups(5, 6, "bfloat16")] == [(0xFF80, 0), (0x007F, 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_time_halves_give_the_bits_of_compile_time_halves(dtype):
    """One program with the halves as data flips what a program per halves flips, and a group
    at halves 0 flips nothing."""
    rng = np.random.default_rng()
    n = 1 << 16
    x_bits = jax.lax.bitcast_convert_type(jnp.asarray(rng.standard_normal(n) * 3, dtype), BITS_DTYPE[dtype])
    index = jnp.arange(n, dtype=jnp.uint32)
    seeds = [jnp.uint32(int(s)) for s in rng.integers(0, 2**31 - 16, 2)]
    run_time = jax.jit(lambda e, f: flip_bits(x_bits, index, *seeds, e, f, dtype, mulhilo))
    for exp_halves, frac_halves in ((1, 3), (4, 13), (12, 19), (0, 6), (7, 0)):
        static = flip_bits(x_bits, index, *seeds, exp_halves or None, frac_halves or None, dtype, mulhilo)
        got = run_time(jnp.int32(exp_halves), jnp.int32(frac_halves))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(static), err_msg=f"{exp_halves}, {frac_halves}")
        changed = np.asarray(got) ^ np.asarray(x_bits)
        assert bool((changed & SIGN_EXP_MASK[dtype]).any()) == (exp_halves > 0)
        if frac_halves < 19:  # at 19, ~1 flip is expected: it may be none
            assert bool((changed & FRAC_MASK[dtype]).any()) == (frac_halves > 0)
    assert run_time._cache_size() == 1
