"""Philox-4x32 exactly as ``triton.language.randint4x`` computes it, and the flip masks.

This module is the single source of truth for the random bits of jaxflip: the Pallas kernel
(GPU and interpret mode) and the plain ``jax.numpy`` path both call :func:`flip_bits`.
Everything here is elementwise on ``uint32`` arrays, so it traces the same inside a Pallas
kernel body and in ordinary XLA code; only the 32x32->high-32 multiply differs per backend
and is passed in as ``mulhilo``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

# (constant a, uint32 array b) -> (high word, low word) of the 64-bit product a * b.
MulHiLo = Callable[[int, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def mulhilo_16bit_split(a: int, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """High and low 32 bits of the product of the constant ``a`` and uint32 ``b``.

    Portable: the high word from 16-bit halves with only 32-bit multiplies and shifts.
    ``lax.mulhi`` would be shorter, but it lowers to an op XLA's SPMD partitioner rejects,
    and Pallas's Triton lowering has no rule for it; the GPU kernel uses PTX ``mul.hi.u32``
    instead (``kernel.ptx_mulhilo``).
    """
    low16 = jnp.uint32(0xFFFF)
    a_lo, a_hi = jnp.uint32(a & 0xFFFF), jnp.uint32(a >> 16)
    b_lo, b_hi = b & low16, b >> 16
    lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    carry = ((lo_lo >> 16) + (lo_hi & low16) + (hi_lo & low16)) >> 16
    return a_hi * b_hi + (lo_hi >> 16) + (hi_lo >> 16) + carry, jnp.uint32(a) * b

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57

# Sign+exponent and fraction masks, in the unsigned integer type of the float's width.
SIGN_EXP_MASK = {"float32": 0xFF800000, "float16": 0xFC00, "bfloat16": 0xFF80}
FRAC_MASK = {"float32": 0x007FFFFF, "float16": 0x03FF, "bfloat16": 0x007F}
BITS_DTYPE = {"float32": jnp.uint32, "float16": jnp.uint16, "bfloat16": jnp.uint16}


def philox_rounds(halves: int) -> int:
    """Philox rounds mase-triton uses for a group with ``halves`` (SPEC: 10 / 12 / 16)."""
    if halves < 13:
        return 10
    if halves < 19:
        return 12
    return 16


def philox4x32(counter: jnp.ndarray, key: jnp.ndarray, n_rounds: int, mulhilo: MulHiLo = mulhilo_16bit_split):
    """Philox-4x32 of counter ``(counter, 0, 0, 0)`` and key ``(key, 0)``.

    ``counter`` is a uint32 array, ``key`` a uint32 scalar (the low word of the seed; the
    high word is 0 for every seed in jaxflip's contract, seed < 2**31 - 8). Returns the four
    uint32 output words. Words a caller never uses are dead code for XLA / Triton, so asking
    for fewer words than four costs fewer multiplies in the last round.
    """
    u32 = jnp.uint32
    c0 = counter
    c1 = c2 = c3 = jnp.zeros_like(counter)
    k0 = key.astype(u32)
    k1 = jnp.zeros_like(k0)
    for _ in range(n_rounds):
        hi_b, lo_b = mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + u32(PHILOX_KEY_A)
        k1 = k1 + u32(PHILOX_KEY_B)
    return c0, c1, c2, c3


def philox_calls(halves: int) -> int:
    """Philox calls one group needs: ``ceil(halves / 4)`` (four words per call)."""
    return -(-halves // 4)


def group_flip_word(
    index: jnp.ndarray,
    seed: jnp.ndarray,
    halves: int,
    group_mask: int,
    mulhilo: MulHiLo = mulhilo_16bit_split,
    early_exit: bool = False,
) -> jnp.ndarray:
    """uint32 word whose bits of ``group_mask`` are set with probability ``0.5 ** halves`` each.

    ``group_mask`` AND ``halves`` independent Philox words: ``q, r = divmod(halves, 4)``; the
    four words of ``philox(seed + k, index)`` for ``k < q``, then the first ``r`` words of
    ``philox(seed + q, index)``. mase-triton also computes ``philox(seed + q)`` when r == 0
    and discards it; we do not compute it at all.

    ``early_exit``: ANDing can only clear bits, so once no bit of ``group_mask`` survives in
    the whole array (one kernel block) the remaining Philox calls cannot change the result;
    after each call but the last, a ``lax.cond`` on the array's maximum skips them. The
    result is the same bit for bit; only the work differs. The first call always runs.
    """
    n_rounds = philox_rounds(halves)
    q, r = divmod(halves, 4)
    seed = seed.astype(jnp.uint32)
    n_calls = philox_calls(halves)

    def and_call(k: int, bits: jnp.ndarray) -> jnp.ndarray:
        words = philox4x32(index, seed + jnp.uint32(k), n_rounds, mulhilo)
        for word in words[: 4 if k < q else r]:
            bits = bits & word
        return bits

    def from_call(k: int, bits: jnp.ndarray) -> jnp.ndarray:
        if k == n_calls:
            return bits
        if not early_exit:
            return from_call(k + 1, and_call(k, bits))
        # jnp.any lowers to a reduce_or that Pallas's Triton lowering lacks; an int32 max lowers
        survivors = jnp.max((bits != 0).astype(jnp.int32))
        return lax.cond(survivors > 0, lambda b: from_call(k + 1, and_call(k, b)), lambda b: b, bits)

    return from_call(1, and_call(0, jnp.uint32(group_mask)))


def flip_bits(
    bits: jnp.ndarray,
    index: jnp.ndarray,
    seed_exp: jnp.ndarray,
    seed_frac: jnp.ndarray,
    exp_halves: int | None,
    frac_halves: int | None,
    dtype_name: str,
    mulhilo: MulHiLo = mulhilo_16bit_split,
    early_exit: bool = False,
) -> jnp.ndarray:
    """Flip the bits of ``bits`` (the float's bit pattern, uint16 or uint32) at ``index``.

    The exponent group then the fraction group, each with its own halves and seed. The
    Philox words are 32-bit; for 16-bit floats the reference truncates each word to 16 bits
    before ANDing, which equals truncating the AND, so we AND in uint32 and narrow once.
    ``early_exit``: see :func:`group_flip_word` (for a kernel block, not a whole tensor).
    """
    bits_dtype = bits.dtype
    for halves, seed, mask in (
        (exp_halves, seed_exp, SIGN_EXP_MASK[dtype_name]),
        (frac_halves, seed_frac, FRAC_MASK[dtype_name]),
    ):
        if halves is None:
            continue
        word = group_flip_word(index, seed, halves, mask, mulhilo, early_exit)
        bits = bits ^ word.astype(bits_dtype)
    return bits


def zero_out_keep(bits: jnp.ndarray, dtype_name: str, threshold: float) -> jnp.ndarray:
    """``|y| < threshold`` for the float whose bit pattern is ``bits`` (False for NaN, inf).

    Compared in float32 like the reference (its threshold is a float32 kernel argument and
    16-bit values promote); the zeroed output is then written as bits, ``+0.0``.
    """
    value = lax.bitcast_convert_type(bits, getattr(jnp, dtype_name)).astype(jnp.float32)
    return jnp.abs(value) < jnp.float32(threshold)
