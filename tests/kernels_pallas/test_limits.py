"""The op's limits, which the rules, the train config and the torch bridge check against."""

import numpy as np
import pytest

from jaxflip.kernels_pallas.limits import MAX_HALVES, SEED_LIMIT, check_seed, flip_halves


def test_flip_halves_snaps_a_supported_probability_down_to_a_power_of_half():
    rng = np.random.default_rng()
    for halves in rng.integers(1, MAX_HALVES + 1, 20):
        p = 0.5**halves * rng.uniform(1.0, 2.0)  # in [0.5**halves, 0.5**(halves - 1))
        assert flip_halves("p", p) == halves


def test_flip_halves_takes_the_smallest_supported_probability_and_refuses_below_it():
    assert flip_halves("w_p_exp", 0.5**MAX_HALVES) == MAX_HALVES
    below = 0.5**MAX_HALVES * np.random.default_rng().uniform(0.5, 0.999)
    with pytest.raises(ValueError, match=r"w_p_exp=.* is below the smallest supported flip probability 0.5\*\*24"):
        flip_halves("w_p_exp", below)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.25, 1.5, True, "0.1"])
def test_flip_halves_refuses_what_is_not_a_probability(p):
    with pytest.raises(ValueError, match=r"x_p_frac must be a probability in \(0, 1\) or None"):
        flip_halves("x_p_frac", p)


def test_check_seed_takes_the_contract_range_and_nothing_else():
    seed = int(np.random.default_rng().integers(0, SEED_LIMIT))
    assert check_seed("seed", np.int64(seed)) == seed and check_seed("seed", SEED_LIMIT - 1) == SEED_LIMIT - 1
    for bad in (-1, SEED_LIMIT, float(seed), True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*31 - 8\)"):
            check_seed("seed", bad)


def test_calculate_flip_probability_is_mase_s_also_above_the_kernel_s_halves():
    from jaxflip.kernels_pallas.limits import calculate_flip_probability

    halves = int(np.random.default_rng().integers(MAX_HALVES + 1, 80))
    assert calculate_flip_probability(halves) == 0.5**halves
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=r"halves must be an int >= 1 or None"):
            calculate_flip_probability(bad)
