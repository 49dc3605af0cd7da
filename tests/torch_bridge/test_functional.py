"""random_bitflip_fn: the JAX op's flips and seeds on a torch tensor, under mase-triton's name."""

import numpy as np
import pytest
import torch

import jaxflip
from jaxflip.torch_bridge import random_bitflip_fn


def test_the_torch_function_flips_and_advances_seeds_as_the_jax_op():
    rng = np.random.default_rng()
    x = rng.standard_normal((33, 70)).astype(np.float32) * 10
    exp_halves, frac_halves = (int(h) for h in rng.integers(1, 6, size=2))
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, 2**30, size=2))
    y, next_exp, next_frac = random_bitflip_fn(torch.from_numpy(x.copy()), exp_halves, frac_halves,
                                               seed_exp, seed_frac, 20.0)
    want, want_exp, want_frac = jaxflip.random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, 20.0)
    assert np.array_equal(y.numpy().view(np.uint32), np.asarray(want).view(np.uint32))
    assert not np.array_equal(y.numpy(), x)  # halves <= 5 over 2,310 elements: flips happen
    assert (next_exp, next_frac) == (int(want_exp), int(want_frac))


def test_the_old_name_still_works_for_one_release_and_says_so():
    import jaxflip.torch_bridge as bridge

    with pytest.warns(DeprecationWarning, match="use random_bitflip_fn"):
        assert bridge.random_bitflip is random_bitflip_fn
