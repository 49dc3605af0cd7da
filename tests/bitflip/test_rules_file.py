"""Bitflip config files: NewComputeBench's regex rules and the training ``[bitflip]`` section."""

import pytest

from jaxflip.bitflip import BitflipConfig
from jaxflip.bitflip.rules_file import load_bitflip_config, read_bitflip_config

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
SETTINGS = dict(x_p_exp=0.5**16, x_p_frac=0.5**10, x_zero_out_t=8192.0, w_p_exp=None, w_p_frac=0.5**16,
                w_zero_out_t=256.0)


def test_rules_file_in_yaml_and_toml_reads_the_same(tmp_path):
    (tmp_path / "rules.yaml").write_text(
        "'model\\.layers\\.0\\.mlp\\..*': null\n"
        "default: {x_p_exp: 1.52587890625e-05, x_p_frac: 0.0009765625, x_zero_out_t: 8192.0, w_p_exp: null,\n"
        "          w_p_frac: 1.52587890625e-05, w_zero_out_t: 256.0}\n")
    (tmp_path / "rules.toml").write_text(
        "'model\\.layers\\.0\\.mlp\\..*' = 'none'\n"
        "[default]\nx_p_exp = 1.52587890625e-05\nx_p_frac = 0.0009765625\nx_zero_out_t = 8192.0\n"
        "w_p_exp = 'none'\nw_p_frac = 1.52587890625e-05\nw_zero_out_t = 256.0\n")
    expected = ({r"model\.layers\.0\.mlp\..*": None, "default": SETTINGS}, "reference", 0)
    assert load_bitflip_config(tmp_path / "rules.yaml") == expected
    assert load_bitflip_config(tmp_path / "rules.toml") == expected


def seeding(config: BitflipConfig) -> tuple[str, int]:
    return config.resolved_seed_mode, config.resolved_base_seed


def test_section_becomes_a_default_rule_with_substring_skips():
    config = BitflipConfig.from_mapping(SETTINGS | {"base_seed": 5, "skip_patterns": ["mlp."]})
    assert config.rule_mapping() == {r".*mlp\..*": None, "default": SETTINGS}
    assert seeding(config) == ("independent", 5)


def test_section_without_base_seed_uses_reference_seeds():
    assert seeding(BitflipConfig.from_mapping(SETTINGS)) == ("reference", 0)


def test_section_in_a_training_config_file(tmp_path):
    """The 70B tutorial's form: other sections are ignored, torchtitan's ``output`` names no
    HF layer and is dropped with a warning."""
    (tmp_path / "train.toml").write_text(
        "[training]\nsteps = 20\n\n[bitflip]\nw_p_exp = 1.52587890625e-05\nw_zero_out_t = 256.0\n"
        "base_seed = 0\nskip_patterns = ['output', 'q_proj']\n")
    with pytest.warns(UserWarning, match="'output' names no layer"):
        rules, seed_mode, _ = load_bitflip_config(tmp_path / "train.toml", layer_names=LAYERS)
    assert list(rules) == [".*q_proj.*", "default"] and rules["default"]["w_p_exp"] == 0.5**16
    assert seed_mode == "independent"


def test_disabled_section_flips_nothing():
    config = BitflipConfig.from_mapping(SETTINGS | {"enable": False})
    assert config.rule_mapping() == {}
    assert not any(row.flipped for row in config.match(LAYERS))


def test_section_rules_replace_the_fields():
    regex_rules = {r"model\.layers\.0\..*": SETTINGS}
    config = BitflipConfig.from_mapping({"rules": regex_rules, "w_p_exp": 0.5, "seed_mode": "reference"})
    assert (config.rule_mapping(), *seeding(config)) == (regex_rules, "reference", 0)


@pytest.mark.parametrize("text, message", [
    ("[bitflip]\nw_p_exp = 0.1\nbogus = 1\n", r"unknown field\(s\) \['bogus'\]"),
    ("[bitflip]\nx_p_frac = 1.5\n", r"bitflip.x_p_frac must be a probability in \(0, 1\)"),
    ("'model\\.layers\\..*' = {x_zero_out_t = -2.0}\n", "bitflip rule 'model.*x_zero_out_t must be a number >= 0"),
    ("[bitflip]\nseed_mode = 'random'\n", "seed_mode must be one of"),
    ("[bitflip]\nbase_seed = -1\n", "base_seed must be an integer >= 0"),
    ("[bitflip]\nskip_patterns = ['']\n", "skip_patterns entries must be non-empty strings"),
    ("not toml at all [", "cannot parse"),
])
def test_malformed_files_raise_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_bitflip_config(path)
    assert str(error.value).startswith(f"{path}: ")
