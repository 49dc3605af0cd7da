"""Early exit in ``philox.group_flip_word``: skipping a block's remaining Philox calls once no
masked bit survives changes no bit (the kernel runs it per block; the jnp path, the source of
truth, never exits).

The tests pass ``lax.mulhi`` as the Philox multiply: exact on CPU, and five times quicker to
compile than the portable 16-bit split (which ``test_random_bitflip.py`` checks against
mase-triton); the exit logic does not depend on how the product is formed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxflip.kernels_pallas.philox import (BITS_DTYPE, FRAC_MASK, SIGN_EXP_MASK, flip_bits, philox4x32,
                                           philox_calls, philox_rounds)

BLOCK = 32  # a warp: the block size where the exit pays most (issue 12)
N_BLOCKS = 1024


def mulhilo(a, b):
    return lax.mulhi(jnp.uint32(a), b), jnp.uint32(a) * b


philox_jit = jax.jit(lambda index, seed, n_rounds: philox4x32(index, seed, n_rounds, mulhilo), static_argnums=2)


def survivors_after_each_call(index, seed, halves, group_mask):
    """Per block, whether any masked bit survives the ANDs of calls 0..k, for each k (numpy)."""
    q, r = divmod(halves, 4)
    bits = np.full(index.shape, group_mask, np.uint32)
    alive = []
    for k in range(philox_calls(halves)):
        words = philox_jit(jnp.asarray(index), jnp.uint32(seed + k), philox_rounds(halves))
        for word in words[: 4 if k < q else r]:
            bits &= np.asarray(word)
        alive.append(bits.reshape(-1, BLOCK).any(axis=1))
    return np.stack(alive)  # (calls, blocks)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("exp_halves,frac_halves", [(1, 24), (24, 12), (16, 4)])
def test_early_exit_per_block_is_bit_identical(dtype, exp_halves, frac_halves):
    rng = np.random.default_rng()
    n = BLOCK * N_BLOCKS
    base = int(rng.integers(0, 2**31 - 2**20))
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, 2**31 - 16, 2))
    x = jnp.asarray(rng.standard_normal(n) * 3, jnp.float32).astype(dtype)
    x_bits = jax.lax.bitcast_convert_type(x, BITS_DTYPE[dtype])
    index = jnp.arange(n, dtype=jnp.uint32) + jnp.uint32(base)
    seeds = jnp.uint32(seed_exp), jnp.uint32(seed_frac)

    @jax.jit
    def per_block(x_bits, index, seed_exp, seed_frac):  # as the kernel: one lax.cond chain per block
        return jax.lax.map(lambda block: flip_bits(*block, seed_exp, seed_frac, exp_halves, frac_halves, dtype,
                                                   mulhilo, early_exit=True),
                           (x_bits.reshape(-1, BLOCK), index.reshape(-1, BLOCK))).reshape(-1)

    got = per_block(x_bits, index, *seeds)
    # the jnp path (no exit, the portable multiply), at the same global indices
    want = flip_bits(x_bits, index, *seeds, exp_halves, frac_halves, dtype)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert (np.asarray(want) != np.asarray(x_bits)).any()

    # not vacuous: where a group has calls left, some blocks exit early and some run on
    for halves, seed, mask in ((exp_halves, seed_exp, SIGN_EXP_MASK[dtype]), (frac_halves, seed_frac, FRAC_MASK[dtype])):
        if philox_calls(halves) >= 4:
            alive = survivors_after_each_call(np.asarray(index), seed, halves, mask)[:-1]
            assert (~alive).any() and alive.any(), (halves, alive.mean(axis=1))
