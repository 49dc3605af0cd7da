"""BitflipConfig: the one bitflip settings dataclass, checked when built, parsed once."""

import dataclasses

import numpy as np
import pytest

from jaxflip.bitflip import MAX_HALVES, BitflipConfig, match_rules
from jaxflip.kernels_pallas import limits

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
          "lm_head"]


def random_settings(rng) -> dict:
    """Probabilities anywhere in the kernel's range (most not powers of two), thresholds > 0."""
    def probability():
        return float(0.5 ** rng.uniform(0.01, MAX_HALVES))

    return dict(x_p_exp=probability(), x_p_frac=probability(), w_p_exp=probability(), w_p_frac=probability(),
                x_zero_out_t=float(rng.uniform(1, 100)), w_zero_out_t=float(rng.uniform(0.1, 2)))


@pytest.mark.parametrize("base_seed", [None, 7])
def test_fields_flip_as_their_rules_in_newcomputebench_form(base_seed):
    """The fields, parsed once into rules, match the layers as the same settings written as
    NewComputeBench's regex rules do (the form ``rule_mapping`` exports)."""
    settings = random_settings(np.random.default_rng())
    config = BitflipConfig(**settings, base_seed=base_seed, skip_patterns=["lm_head", "layers.1."])
    table = config.match(LAYERS)
    expected = match_rules(LAYERS, {r".*lm_head.*": None, r".*layers\.1\..*": None, "default": settings},
                           "reference" if base_seed is None else "independent", base_seed or 0)
    assert table == expected
    assert [row.layer for row in table if row.flipped] == LAYERS[:2]
    assert config.rule_mapping(LAYERS) == {r".*lm_head.*": None, r".*layers\.1\..*": None, "default": settings}


def test_a_skip_substring_that_names_no_layer_is_dropped_with_a_warning():
    config = BitflipConfig(w_p_exp=0.5**8, skip_patterns=["output", "q_proj"])
    with pytest.warns(UserWarning, match="bitflip.skip_patterns entry 'output' names no layer"):
        table = config.match(LAYERS)
    assert [row.layer for row in table if row.flipped] == LAYERS[1:3]


@pytest.mark.parametrize("written", ["none", "null", []])
def test_skip_patterns_none_in_a_file_skips_no_layer(written):
    """TOML has no null: ``skip_patterns = "none"`` is how a file skips nothing (the default rule
    still leaves the LM head alone, as NewComputeBench's does)."""
    settings = random_settings(np.random.default_rng())
    config = BitflipConfig.from_mapping({**settings, "skip_patterns": written})
    assert [row.layer for row in config.match(LAYERS) if row.flipped] == LAYERS[:3]


@pytest.mark.parametrize("field, value, message", [
    ("x_p_exp", 1.5, r"bitflip.x_p_exp must be a probability in \(0, 1\) or None, got 1.5"),
    ("w_p_frac", 0.5**25, r"bitflip.w_p_frac=.* is below the smallest supported flip probability 0.5\*\*24"),
    ("x_zero_out_t", -1.0, r"bitflip.x_zero_out_t must be a number >= 0 or None, got -1.0"),
    ("base_seed", -3, r"bitflip.base_seed must be an integer >= 0 or None, got -3"),
    ("seed_mode", "random", r"bitflip.seed_mode must be one of \('reference', 'independent'\), got 'random'"),
    ("skip_patterns", [""], r"bitflip.skip_patterns entries must be non-empty strings, got ''"),
    ("rules", {"default": {"w_seed_exp": -1}}, r"bitflip.rules: bitflip rule 'default': w_seed_exp must be an int"),
    ("enable", "yes", r"bitflip.enable must be true or false, got 'yes'"),
])
def test_a_bad_field_is_refused_when_built_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message):
        BitflipConfig(**{field: value})
    with pytest.raises(ValueError, match=message):  # a changed copy is checked again
        dataclasses.replace(BitflipConfig(), **{field: value})


def test_the_bitflip_limits_are_the_ops():
    """One definition: the names code above the op uses are the op's own."""
    import jaxflip.bitflip as bitflip

    for name in ("MAX_HALVES", "SEED_LIMIT", "flip_halves", "check_seed", "calculate_flip_probability",
                 "find_nearest_prob_n_halves"):
        assert getattr(bitflip, name) is getattr(limits, name), name
