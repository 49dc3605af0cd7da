"""Philox-4x32 exactly as ``triton.language.randint4x`` computes it, and the flip masks.

This module is the single source of truth for the random bits of jaxflip: the Pallas kernel
(GPU and interpret mode) and the plain ``jax.numpy`` path both call :func:`flip_bits`.
Everything here is elementwise on ``uint32`` arrays, so it traces the same inside a Pallas
kernel body and in ordinary XLA code; only the 32x32->high-32 multiply differs per backend
and is passed in as ``mulhilo``.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# mase-triton's Philox rounds by halves (SPEC): 10 below 13 halves, 12 below 19, else 16
ROUND_COUNTS = (10, 12, 16)
MORE_ROUNDS_FROM = (13, 19)  # the halves at which the next round count starts


def philox_rounds(halves: int) -> int:
    """Philox rounds mase-triton uses for a group with ``halves`` (SPEC: 10 / 12 / 16)."""
    return ROUND_COUNTS[sum(halves >= start for start in MORE_ROUNDS_FROM)]


def rounds_index(halves: jnp.ndarray) -> jnp.ndarray:
    """Run-time ``ROUND_COUNTS.index(philox_rounds(halves))`` of an int32 ``halves``."""
    return sum((halves >= start).astype(jnp.int32) for start in MORE_ROUNDS_FROM)


def philox4x32(counter: jnp.ndarray, key: jnp.ndarray, n_rounds: int, mulhilo: MulHiLo = mulhilo_16bit_split):
    """Philox-4x32 of counter ``(counter, 0, 0, 0)`` and key ``(key, 0)``.

    ``counter`` is a uint32 array, ``key`` a uint32 scalar or array (the low word of the seed;
    the high word is 0 for every seed in jaxflip's contract, seed < 2**31 - 8). Returns the
    four uint32 output words. Words a caller never uses are dead code for XLA / Triton, so
    asking for fewer words than four costs fewer multiplies in the last round.
    """
    return philox4x32_after(counter, key, (n_rounds,), mulhilo)[0]


def philox4x32_after(counter: jnp.ndarray, key: jnp.ndarray, rounds: tuple[int, ...],
                     mulhilo: MulHiLo = mulhilo_16bit_split):
    """The four Philox words after each of ``rounds`` (ascending) rounds, from one pass: for
    elements whose round count differs (two groups of different halves in one loop)."""
    u32 = jnp.uint32
    c0 = counter
    c1 = c2 = c3 = jnp.zeros_like(counter)
    k0 = key.astype(u32)
    k1 = jnp.zeros_like(k0)
    states = []
    for done in range(1, rounds[-1] + 1):
        hi_b, lo_b = mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = k0 + u32(PHILOX_KEY_A)
        k1 = k1 + u32(PHILOX_KEY_B)
        if done in rounds:
            states.append((c0, c1, c2, c3))
    return states


def philox_calls(halves):
    """Philox calls one group needs: ``ceil(halves / 4)`` (four words per call); 0 when off."""
    return -(-halves // 4)


@dataclass(frozen=True)
class FlipGroup:
    """One group of bits flipped together: its ``halves`` (a Python int or a run-time int32
    scalar; 0: the group is off), its bit ``mask`` and which seed (0: exponent's, 1:
    fraction's) keys its Philox stream."""

    halves: object
    mask: int
    seed: int


def flip_groups(exp_halves, frac_halves, dtype_name: str, shared_seed: bool = False) -> tuple[FlipGroup, ...]:
    """The exponent group then the fraction group (the order the reference applies them).

    ``shared_seed``: the two seeds are equal and so are the halves; both groups then AND the
    same Philox words, so they are one group whose mask is both masks (half the calls, the
    same bits): the reference's own seeds (every layer starts both at 0) are always so. The
    caller checks that the halves are equal (they may be run-time values).
    """
    if shared_seed:
        return (FlipGroup(exp_halves, SIGN_EXP_MASK[dtype_name] | FRAC_MASK[dtype_name], 0),)
    return (FlipGroup(exp_halves, SIGN_EXP_MASK[dtype_name], 0), FlipGroup(frac_halves, FRAC_MASK[dtype_name], 1))


def and_call_words(bits: jnp.ndarray, words, n_words) -> jnp.ndarray:
    """``bits`` AND the first ``n_words`` of a Philox call's four ``words``; ``n_words`` an
    int, or an int32 array or scalar (per element or run-time: how many words the call gives)."""
    if isinstance(n_words, int):
        for word in words[:n_words]:
            bits = bits & word
        return bits
    all_ones = jnp.uint32(0xFFFFFFFF)
    for k, word in enumerate(words):
        bits = bits & (word if k == 0 else jnp.where(n_words > k, word, all_ones))
    return bits


def group_flip_word(
    index: jnp.ndarray,
    seed: jnp.ndarray,
    halves,
    group_mask: int,
    mulhilo: MulHiLo = mulhilo_16bit_split,
) -> jnp.ndarray:
    """uint32 word whose bits of ``group_mask`` are set with probability ``0.5 ** halves`` each
    (``halves`` a run-time int32 scalar or an int; 0: no bit set, no Philox run).

    ``group_mask`` AND ``halves`` independent Philox words: ``q, r = divmod(halves, 4)``; the
    four words of ``philox(seed + k, index)`` for ``k < q``, then the first ``r`` words of
    ``philox(seed + q, index)``. mase-triton also computes ``philox(seed + q)`` when r == 0
    and discards it; we do not compute it at all.

    The round count selects one of three branches (uniform over the array), each a loop over
    the calls whose body, one call's Philox and AND, XLA fuses whole. On a 2-core CPU, 2**20
    float32 at halves 16 and a zero-out: 37 ms against 31 ms with the halves as constants, and
    it compiles in 0.9 s against 1.3 s (a branch per calls-and-rounds case, fully unrolled,
    ran at 31 ms but took 7.8 s to compile per flipped tensor).
    """
    halves = jnp.asarray(halves, jnp.int32)
    seed = seed.astype(jnp.uint32)
    full_calls, last_words = halves // 4, halves % 4

    def with_rounds(n_rounds):
        def flip_word():
            def call(k, bits):
                words = philox4x32(index, seed + k.astype(jnp.uint32), n_rounds, mulhilo)
                return and_call_words(bits, words, jnp.where(k < full_calls, 4, last_words))
            return lax.fori_loop(0, philox_calls(halves), call, jnp.full(index.shape, group_mask, jnp.uint32))
        return flip_word

    branch = jnp.where(halves == 0, 0, 1 + rounds_index(halves))
    return lax.switch(branch, [lambda: jnp.zeros(index.shape, jnp.uint32)] + [with_rounds(r) for r in ROUND_COUNTS])


def flip_bits(
    bits: jnp.ndarray,
    index: jnp.ndarray,
    seed_exp: jnp.ndarray,
    seed_frac: jnp.ndarray,
    exp_halves,
    frac_halves,
    dtype_name: str,
    mulhilo: MulHiLo = mulhilo_16bit_split,
    shared_seed: bool = False,
) -> jnp.ndarray:
    """Flip the bits of ``bits`` (the float's bit pattern, uint16 or uint32) at ``index``.

    The exponent group then the fraction group, each with its own halves (run-time int32
    scalars or ints; 0 or None: that group off) and seed. The Philox words are 32-bit; for
    16-bit floats the reference truncates each word to 16 bits before ANDing, which equals
    truncating the AND, so we AND in uint32 and narrow once. ``shared_seed``: the caller
    knows the seeds and the halves are equal (:func:`flip_groups`).
    """
    seeds = (seed_exp, seed_frac)
    exp_halves, frac_halves = (0 if halves is None else halves for halves in (exp_halves, frac_halves))
    for group in flip_groups(exp_halves, frac_halves, dtype_name, shared_seed):
        word = group_flip_word(index, seeds[group.seed], group.halves, group.mask, mulhilo)
        bits = bits ^ word.astype(bits.dtype)
    return bits


def zero_out_keep(bits: jnp.ndarray, dtype_name: str, threshold) -> jnp.ndarray:
    """``|y| < threshold`` for the float whose bit pattern is ``bits`` (False for NaN, inf).

    Compared in float32 like the reference (its threshold is a float32 kernel argument and
    16-bit values promote); the zeroed output is then written as bits, ``+0.0``. ``threshold``:
    a float or a run-time float32 scalar.
    """
    value = lax.bitcast_convert_type(bits, getattr(jnp, dtype_name)).astype(jnp.float32)
    return jnp.abs(value) < jnp.asarray(threshold, jnp.float32)


def setting_keep(bits: jnp.ndarray, dtype_name: str, zero_out, threshold_bits) -> jnp.ndarray:
    """The keep mask of a run-time setting: ``zero_out_keep`` where the setting zeroes out
    (``zero_out`` nonzero, the threshold as float32 bits), all True where it does not."""
    threshold = lax.bitcast_convert_type(jnp.asarray(threshold_bits).astype(jnp.uint32), jnp.float32)
    return zero_out_keep(bits, dtype_name, threshold) | (zero_out == 0)
