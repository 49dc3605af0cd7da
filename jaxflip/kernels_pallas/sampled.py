"""Sampled flips (``exact=False``): mase-triton's fault distribution, not its Philox stream.

The fault model of ``SPEC.md``: every bit of a group (sign+exponent, or fraction) flips
independently with probability ``p = 0.5 ** halves``. mase-triton draws it by ANDing
``halves`` Philox words per element and group, so its cost grows with ``halves`` although
almost no element flips at the halves training uses (0.5^16: a bf16 element has any bit
flipped with probability 2.4e-4). Here the same distribution is drawn with a few hashed words
per element, whatever ``halves``:

* **Sparse** (``halves >= SPARSE_FROM_HALVES``): the flipped bits of a group of ``B`` bits are
  the arrivals of a Bernoulli(p) process over its bits, and the gaps between successive flips
  are independent geometric variables. Each of ``SPARSE_DRAWS`` draws turns one uniform word
  ``w`` into a gap by inversion, ``floor(log1p(-w / 2**32) / log1p(-p))``, and the flip lands at
  the previous position + 1 + gap while that stays inside the group. This is the exact law of
  the first ``SPARSE_DRAWS`` flips of a group; a group with more flips keeps only those, which
  has probability below ``C(23, 4) * 0.5**36 = 1.3e-7`` per element (float32 fraction, 23
  bits, at the largest sparse p, 0.5**9): a relative bias below 3e-6 in a bit's flip rate.
  A word resolves the probability of a flip to 2**-32; this is the sampler's only other error.
* **Dense** (``halves < SPARSE_FROM_HALVES``, p >= 1/256): one word per bit, the bit flips
  when the word is below ``p * 2**32`` (exact for ``p = 0.5 ** halves``).

The words come from a counter-based hash: element ``i``'s word of draw ``d`` of a group with
seed ``s`` is ``mix(mix(i + k0) ^ k1)``, ``mix`` the lowbias32 integer finalizer (a bijection
of uint32 with full avalanche, two multiplies) and ``(k0, k1)`` hashed from ``(s, group,
d)``. Flips are thus a pure function of the tensor, the setting, the seeds and the global
element index, as exact mode's are: N devices flip what one does (XLA partitions this
elementwise code; each device hashes its own indices), remat recomputes the same flips, and a
seed advanced by a call (``advance_seed``, as in exact mode) keys a new, independent stream.
The suite checks the law (``tests/kernels_pallas/test_sampled.py``): each bit's rate, pairs
of bits within an element, neighbouring elements, successive calls and the bits outside the
groups, against their binomial expectations.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxflip.kernels_pallas.philox import FRAC_MASK, SIGN_EXP_MASK

SPARSE_FROM_HALVES = 9  # p <= 0.5**9: geometric gaps; above, one word per bit
SPARSE_DRAWS = 3  # flips drawn per element and group in the sparse form
GROUP_SALT = (0x68E31DA4, 0xB5297A4D)  # the exponent group's and the fraction group's


def mix(x: jnp.ndarray) -> jnp.ndarray:
    """lowbias32 (C. Wellons' hash-prospector): a bijection of uint32 with low bias."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def draw_keys(seed: jnp.ndarray, group: int, draw: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The two key words of one draw of one group (uint32 scalars): each is hashed from all of
    ``(seed, group, draw)``, so that nearby seeds key unrelated streams."""
    k0 = mix(seed.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(GROUP_SALT[group] + draw))
    return k0, mix(k0 ^ jnp.uint32(0x85EBCA6B + draw))


def uniform_word(index: jnp.ndarray, keys: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
    """One uint32 word per element of ``index`` (global element indices), keyed by ``keys``."""
    return mix(mix(index + keys[0]) ^ keys[1])


def group_bits(mask: int) -> tuple[int, int]:
    """``(lowest bit, bit count)`` of a group's mask (each group's bits are contiguous)."""
    low = (mask & -mask).bit_length() - 1
    return low, mask.bit_count()


def _dense_word(index, seed, group: int, mask: int, halves) -> jnp.ndarray:
    low, count = group_bits(mask)
    threshold = jnp.left_shift(jnp.uint32(1), (32 - halves).astype(jnp.uint32))  # p * 2**32, halves >= 1
    word = jnp.zeros(index.shape, jnp.uint32)
    for bit in range(count):
        flips = uniform_word(index, draw_keys(seed, group, SPARSE_DRAWS + bit)) < threshold
        word = word | jnp.where(flips, jnp.uint32(1 << (low + bit)), jnp.uint32(0))
    return word


def _sparse_word(index, seed, group: int, mask: int, halves) -> jnp.ndarray:
    low, count = group_bits(mask)
    log_stay = jnp.log1p(-jnp.exp2(-halves.astype(jnp.float32)))  # log(1 - p) < 0
    position = jnp.full(index.shape, -1, jnp.int32)
    word = jnp.zeros(index.shape, jnp.uint32)
    for draw in range(SPARSE_DRAWS):
        uniform = uniform_word(index, draw_keys(seed, group, draw)).astype(jnp.float32) * jnp.float32(2.0**-32)
        gap = jnp.floor(jnp.log1p(-uniform) / log_stay)  # +inf where the word rounds to 1.0: no flip
        position = position + 1 + jnp.minimum(gap, count).astype(jnp.int32)
        inside = position < count
        word = word | jnp.where(inside, jnp.left_shift(jnp.uint32(1), (low + jnp.minimum(position, count - 1))
                                                       .astype(jnp.uint32)), jnp.uint32(0))
    return word


def sampled_group_word(index, seed, halves, group: int, mask: int) -> jnp.ndarray:
    """uint32 word whose bits of ``mask`` are set independently with probability
    ``0.5 ** halves`` (a run-time int32 scalar; 0: none, and nothing drawn)."""
    halves = jnp.asarray(halves, jnp.int32)
    branch = jnp.where(halves == 0, 0, jnp.where(halves < SPARSE_FROM_HALVES, 1, 2))
    return lax.switch(branch, [lambda: jnp.zeros(index.shape, jnp.uint32),
                               lambda: _dense_word(index, seed, group, mask, halves),
                               lambda: _sparse_word(index, seed, group, mask, halves)])


def sampled_flip_bits(bits: jnp.ndarray, index: jnp.ndarray, seed_exp, seed_frac, exp_halves, frac_halves,
                      dtype_name: str) -> jnp.ndarray:
    """``bits`` (a float's bit pattern) with each bit of the exponent group flipped with
    probability ``0.5 ** exp_halves`` and each of the fraction group with ``0.5 ** frac_halves``
    (0: that group off), the groups keyed on their own seeds."""
    groups = ((seed_exp, exp_halves, SIGN_EXP_MASK[dtype_name]), (seed_frac, frac_halves, FRAC_MASK[dtype_name]))
    for group, (seed, halves, mask) in enumerate(groups):
        bits = bits ^ sampled_group_word(index, jnp.asarray(seed), halves, group, mask).astype(bits.dtype)
    return bits
