"""Sampled flips (``exact=False``) follow the fault model's law: every bit of a group flips
independently with probability ``0.5 ** halves``, and no other bit ever flips.

Each check compares a count over 2**22 elements with its expectation under that law, as a z
score with the count's variance under the law (not the sample's, which misjudges rare
events), and fails beyond ``Z_LIMIT``. With about 600 checks in the
file, a correct sampler fails one with probability ~1e-5. The last tests feed the same checks
wrong samplers (p doubled, at most one bit per element, a copied neighbour, a seed that does
not advance) to show that they would be caught.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflip.kernels_pallas import random_bitflip
from jaxflip.kernels_pallas.philox import BITS_DTYPE, FRAC_MASK, SIGN_EXP_MASK

SHAPE = (4096, 1024)  # 2**22 elements
Z_LIMIT = 5.5
MIN_EXPECTED = 25  # a single count is tested alone only where its expectation is this large (normal enough)
NBITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def fresh_tensor(dtype_name: str) -> jax.Array:
    seed = np.random.default_rng().integers(2**31)
    return jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32).astype(dtype_name)


def fresh_seeds() -> tuple[int, int]:
    return tuple(int(s) for s in np.random.default_rng().integers(0, 2**30, 2))


def flip_pattern(x: jax.Array, y: jax.Array) -> np.ndarray:
    """The flipped bits of each element, as uint32."""
    bits = BITS_DTYPE[jnp.dtype(x.dtype).name]
    return np.asarray(jax.lax.bitcast_convert_type(x, bits) ^ jax.lax.bitcast_convert_type(y, bits)).astype(np.uint32)


def bit_probabilities(dtype_name: str, exp_halves, frac_halves) -> np.ndarray:
    """Each bit position's flip probability under the law (0 outside the groups that flip)."""
    p = np.zeros(NBITS[dtype_name])
    for mask, halves in ((SIGN_EXP_MASK[dtype_name], exp_halves), (FRAC_MASK[dtype_name], frac_halves)):
        for bit in range(NBITS[dtype_name]):
            if mask >> bit & 1 and halves is not None:
                p[bit] = 0.5**halves
    return p


def bit_matrix(pattern: np.ndarray, nbits: int) -> np.ndarray:
    """(elements, bits) 0/1 matrix of the flipped bits."""
    return ((pattern.reshape(-1, 1) >> np.arange(nbits, dtype=np.uint32)) & 1).astype(np.uint8)


def z_score(total: float, expected: float, variance: float) -> float:
    return (total - expected) / math.sqrt(variance)


def flip_count_pmf(p: np.ndarray) -> np.ndarray:
    """Law of the number of flipped bits of one element (independent bits)."""
    pmf = np.array([1.0])
    for prob in p:
        pmf = np.convolve(pmf, [1 - prob, prob])
    return pmf


def adjacent_pairs_variance(n: int, p: float) -> float:
    """Variance of the number of i with both a_i and a_{i+1}, a iid Bernoulli(p), over n pairs
    (each pair shares an element with the next)."""
    return n * (p**2 * (1 - p**2) + 2 * (p**3 - p**4))


def popcount(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(words.astype(np.uint32).view(np.uint8).reshape(-1, 4), axis=1).sum(axis=1)


def law_violations(pattern: np.ndarray, p: np.ndarray) -> list[str]:
    """The checks one call's flip pattern (``SHAPE``) fails under per-bit probabilities ``p``."""
    n, failures = pattern.size, []
    bits = bit_matrix(pattern, p.size)
    counts = bits.sum(axis=0, dtype=np.int64)
    for bit, (count, prob) in enumerate(zip(counts, p)):
        if prob == 0:
            if count:
                failures.append(f"bit {bit} is outside the flipped groups and flipped {count} times")
        elif abs(z := (count - n * prob) / math.sqrt(n * prob * (1 - prob))) > Z_LIMIT:
            failures.append(f"bit {bit}: {count} flips, expected {n * prob:.1f} (z={z:.1f})")
    # two bits of one element: each pair's count, and the number of pairs per element
    flipped_rows = bits[bits.any(axis=1)].astype(np.float32)
    together = flipped_rows.T @ flipped_rows
    for a, b in itertools.combinations(range(p.size), 2):
        expected = n * p[a] * p[b]
        if expected >= MIN_EXPECTED and abs(z := (together[a, b] - expected) / math.sqrt(expected)) > Z_LIMIT:
            failures.append(f"bits {a} and {b} flipped together {together[a, b]:.0f} times, expected {expected:.1f}")
    k = bits.sum(axis=1, dtype=np.float64)
    pairs_of = np.arange(p.size + 1) * (np.arange(p.size + 1) - 1) / 2  # C(k, 2)
    pmf = flip_count_pmf(p)
    mean, second_moment = pmf @ pairs_of, pmf @ pairs_of**2
    if abs(z := z_score((k * (k - 1) / 2).sum(), n * mean, n * (second_moment - mean**2))) > Z_LIMIT:
        failures.append(f"pairs of bits flipped in one element: z={z:.1f}")
    # neighbours along a row and along a column: the same bit, and any bit
    grid = pattern.reshape(SHAPE)
    any_flip = 1 - np.prod(1 - p)
    for name, a, b in (("row", grid[:, :-1], grid[:, 1:]), ("column", grid[:-1], grid[1:])):
        pairs = a.size
        same_bit_variance = sum(adjacent_pairs_variance(pairs, prob) for prob in p)
        if abs(z := z_score(popcount(a & b).sum(), pairs * (p**2).sum(), same_bit_variance)) > Z_LIMIT:
            failures.append(f"{name} neighbours flip the same bit: z={z:.1f}")
        both = np.count_nonzero((a != 0) & (b != 0))
        if abs(z := z_score(both, pairs * any_flip**2, adjacent_pairs_variance(pairs, any_flip))) > Z_LIMIT:
            failures.append(f"{name} neighbours both flip: z={z:.1f}")
    return failures


def overlap_violations(first: np.ndarray, second: np.ndarray, p: np.ndarray) -> list[str]:
    """Two calls' patterns flip the same bit of an element as often as independent calls do."""
    n = first.size
    z = z_score(popcount(first & second).sum(), n * (p**2).sum(), n * (p**2 * (1 - p**2)).sum())
    return [] if abs(z) <= Z_LIMIT else [f"successive calls flip the same bits: z={z:.1f}"]


CASES = [  # dtype, exp_halves, frac_halves: one bit per word, geometric gaps, both, one group alone
    ("bfloat16", 2, 3), ("bfloat16", 9, 12), ("float32", 4, 10), ("float32", 12, 16),
    ("float16", 5, None), ("float32", None, 9),
]


@pytest.mark.parametrize("dtype_name, exp_halves, frac_halves", CASES)
def test_sampled_flips_follow_the_law_and_successive_calls_are_independent(dtype_name, exp_halves, frac_halves):
    x, (seed_exp, seed_frac) = fresh_tensor(dtype_name), fresh_seeds()
    p = bit_probabilities(dtype_name, exp_halves, frac_halves)
    y, next_exp, next_frac = random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, exact=False)
    first = flip_pattern(x, y)
    assert law_violations(first, p) == []
    y2, *_ = random_bitflip(x, exp_halves, frac_halves, next_exp, next_frac, exact=False)
    second = flip_pattern(x, y2)
    assert law_violations(second, p) == [] and overlap_violations(first, second, p) == []


def test_the_seeds_advance_as_in_exact_mode():
    x, seeds = fresh_tensor("float32"), fresh_seeds()
    exact = random_bitflip(x, 13, 7, *seeds)[1:]
    assert random_bitflip(x, 13, 7, *seeds, exact=False)[1:] == exact == (seeds[0] + 4, seeds[1] + 2)


def test_sampled_flips_differ_from_exact_ones_and_repeat_for_the_same_seeds():
    x, seeds = fresh_tensor("bfloat16"), fresh_seeds()
    sampled = flip_pattern(x, random_bitflip(x, 6, 6, *seeds, exact=False)[0])  # as bits: flips make NaNs
    assert np.array_equal(sampled, flip_pattern(x, random_bitflip(x, 6, 6, *seeds, exact=False)[0]))
    assert not np.array_equal(sampled, flip_pattern(x, random_bitflip(x, 6, 6, *seeds)[0]))


def test_zero_out_and_gradient_are_those_of_exact_mode():
    """NaN and inf from flipped exponents are zeroed; the gradient passes where y was kept."""
    x, seeds = fresh_tensor("float32"), fresh_seeds()
    y, vjp = jax.vjp(lambda x: random_bitflip(x, 2, None, *seeds, zero_out_threshold=1.5, exact=False)[0], x)
    unbounded = random_bitflip(x, 2, None, *seeds, exact=False)[0]
    kept = np.abs(np.asarray(unbounded, np.float64)) < 1.5
    assert not kept.all() and not np.isfinite(np.asarray(unbounded)).all()
    np.testing.assert_array_equal(np.asarray(y), np.where(kept, np.asarray(unbounded), 0.0))
    grad = np.asarray(vjp(jnp.ones_like(x))[0])
    np.testing.assert_array_equal(grad, kept.astype(np.float32))


# --- the checks catch wrong samplers -------------------------------------------------------


def test_a_sampler_with_p_doubled_is_caught():
    x, seeds = fresh_tensor("bfloat16"), fresh_seeds()
    doubled = flip_pattern(x, random_bitflip(x, 11, 11, *seeds, exact=False)[0])  # 0.5**11 = 2 * 0.5**12
    failures = law_violations(doubled, bit_probabilities("bfloat16", 12, 12))
    assert sum(failure.startswith("bit ") for failure in failures) == 16


def test_a_sampler_flipping_at_most_one_bit_per_element_is_caught():
    x, seeds = fresh_tensor("float32"), fresh_seeds()
    pattern = flip_pattern(x, random_bitflip(x, 9, 9, *seeds, exact=False)[0])
    lowest_bit_only = pattern & (~pattern + np.uint32(1))
    assert any("pairs of bits" in failure for failure in law_violations(lowest_bit_only, bit_probabilities("float32", 9, 9)))


def test_a_sampler_whose_neighbours_copy_each_other_is_caught():
    x, seeds = fresh_tensor("bfloat16"), fresh_seeds()
    pattern = flip_pattern(x, random_bitflip(x, 8, 8, *seeds, exact=False)[0])
    along_rows = pattern.reshape(-1)
    along_rows[1::2] = along_rows[0::2]  # each odd element flips as the even one before it
    assert any("row neighbours" in failure for failure in law_violations(pattern, bit_probabilities("bfloat16", 8, 8)))


def test_a_sampler_whose_seed_does_not_advance_is_caught():
    x, seeds = fresh_tensor("bfloat16"), fresh_seeds()
    p = bit_probabilities("bfloat16", 7, 7)
    first = flip_pattern(x, random_bitflip(x, 7, 7, *seeds, exact=False)[0])
    again = flip_pattern(x, random_bitflip(x, 7, 7, *seeds, exact=False)[0])
    assert overlap_violations(first, again, p) != []
