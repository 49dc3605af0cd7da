"""torchtitan's RoPE row order and HF's: one permutation and its inverse."""

import numpy as np

from jaxflip.models.titan_io import halves_to_interleaved, interleaved_to_halves


def test_rope_row_orders_are_inverse_permutations():
    heads, head_dim, columns = 3, 8, 5
    weight = np.random.default_rng().standard_normal((heads * head_dim, columns)).astype(np.float32)
    halves = interleaved_to_halves(weight, heads)
    assert not np.array_equal(halves, weight)
    assert np.array_equal(halves_to_interleaved(halves, heads), weight)
    # head 0's interleaved pair (0, 1) becomes HF's (0, head_dim / 2)
    assert np.array_equal(halves[[0, head_dim // 2]], weight[[0, 1]])
