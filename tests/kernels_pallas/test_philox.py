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


def test_one_stream_needs_both_groups_at_the_same_halves():
    assert [g.mask for g in flip_groups(5, 5, "bfloat16", shared_seed=True)] == [0xFFFF]
    with pytest.raises(ValueError, match="same halves"):
        flip_groups(5, 6, "bfloat16", shared_seed=True)
