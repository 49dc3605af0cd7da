"""apply_bitflip_rules: NewComputeBench's matching, the returned table, seed modes, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import BitflipSeed, TensorFlip, apply_bitflip_rules, named_linears
from jaxflip.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
FULL = dict(x_p_exp=0.5**10, x_p_frac=0.5**8, x_zero_out_t=30.0, w_p_exp=0.5**10, w_p_frac=0.5**8, w_zero_out_t=1.25)
LAYER_NAMES = [f"model.layers.{i}.{block}.{proj}" for i in range(2)
               for block, projs in (("mlp", ("down_proj", "gate_proj", "up_proj")),
                                    ("self_attn", ("k_proj", "o_proj", "q_proj", "v_proj")))
               for proj in projs]


@pytest.fixture
def model():
    return LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))


def rows_by_layer(table):
    return {row.layer: row for row in table}


def test_linear_names_are_hf_module_names(model):
    assert sorted(named_linears(model)) == sorted(LAYER_NAMES + ["lm_head"])


def test_default_covers_every_linear_but_the_lm_head(model):
    table = apply_bitflip_rules(model, {"default": FULL})
    rows = rows_by_layer(table)
    assert len(rows) == len(LAYER_NAMES) + 1
    for name in LAYER_NAMES:
        assert rows[name].pattern == "default"
        assert rows[name].x_flip == TensorFlip(10, 8, 30.0) and rows[name].w_flip == TensorFlip(10, 8, 1.25)
    assert rows["lm_head"].pattern is None and not rows["lm_head"].flipped
    assert not model.lm_head.x_flip.enabled and not model.lm_head.w_flip.enabled
    assert model.model.layers[1].mlp.up_proj.w_flip == TensorFlip(10, 8, 1.25)


def test_first_matching_pattern_wins_none_skips_and_a_named_lm_head_flips(model):
    rules = {
        r"model\.layers\.0\.self_attn\.(q|k)_proj": dict(x_p_frac=0.3, x_seed_frac=5),  # 0.3 snaps to 0.5**2
        r"model\.layers\.0\.self_attn\..*": None,
        r"lm_head": dict(w_p_exp=0.5**20),
        "default": FULL,
    }
    rows = rows_by_layer(apply_bitflip_rules(model, rules))
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q.pattern == r"model\.layers\.0\.self_attn\.(q|k)_proj"
    assert q.x_flip == TensorFlip(None, 2, None) and not q.w_flip.enabled and q.seeds == (0, 5, 0, 0)
    assert model.model.layers[0].self_attn.q_proj.seeds() == (0, 5, 0, 0)
    for skipped in ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"):
        assert rows[skipped].pattern == r"model\.layers\.0\.self_attn\..*" and not rows[skipped].flipped
    assert rows["model.layers.1.self_attn.v_proj"].pattern == "default"
    assert rows["lm_head"].w_flip == TensorFlip(20, None, None)


def test_without_default_unmatched_layers_are_reset_to_no_flips(model):
    apply_bitflip_rules(model, {"default": FULL})
    rows = rows_by_layer(apply_bitflip_rules(model, {r".*\.mlp\.down_proj": FULL}))
    assert rows["model.layers.0.mlp.down_proj"].flipped
    assert not rows["model.layers.0.mlp.up_proj"].flipped and rows["model.layers.0.mlp.up_proj"].pattern is None
    assert not model.model.layers[0].mlp.up_proj.x_flip.enabled


def test_table_prints_one_line_per_linear(model):
    text = str(apply_bitflip_rules(model, {"default": FULL, "lm_head": None}))
    lines = text.splitlines()
    assert len(lines) == 1 + len(LAYER_NAMES) + 1
    assert lines[0].split()[:2] == ["layer", "rule"]
    q_line = next(line for line in lines if line.startswith("model.layers.1.self_attn.q_proj"))
    assert "default" in q_line and "p_exp=0.5^10 p_frac=0.5^8" in q_line and "zero_out_t=1.25" in q_line


def test_seeds_advance_per_call_under_jit_only_where_flipped(model):
    rules = {"default": dict(FULL, w_p_frac=None, w_seed_exp=100), r".*\.mlp\..*": None}
    apply_bitflip_rules(model, rules)
    forward = nnx.jit(lambda model, ids: model(ids))
    ids = jnp.asarray(np.random.default_rng().integers(0, CONFIG.vocab_size, (2, 8)))
    for _ in range(3):
        forward(model, ids)
    attention = model.model.layers[1].self_attn.k_proj
    step_10, step_8 = math.ceil(10 / 4), math.ceil(8 / 4)
    assert attention.seeds() == (3 * step_10, 3 * step_8, 100 + 3 * step_10, 0)
    assert model.model.layers[1].mlp.gate_proj.seeds() == (0, 0, 0, 0)
    assert model.lm_head.seeds() == (0, 0, 0, 0)


def test_independent_seeds_are_per_layer_deterministic_and_in_range(model):
    rules = {"default": dict(FULL, x_seed_exp=123)}
    table = apply_bitflip_rules(model, rules, seed_mode="independent", base_seed=7)
    seeds = [seed for row in table if row.flipped for seed in row.seeds]
    assert len(set(seeds)) == len(seeds) == 4 * len(LAYER_NAMES)
    assert all(0 <= seed < 2**30 for seed in seeds)
    assert rows_by_layer(table)["lm_head"].seeds == (0, 0, 0, 0)

    again = apply_bitflip_rules(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(1)), rules, seed_mode="independent", base_seed=7)
    assert [row.seeds for row in again] == [row.seeds for row in table]
    other_base = apply_bitflip_rules(model, rules, seed_mode="independent", base_seed=8)
    assert all(a.seeds != b.seeds for a, b in zip(other_base, table) if a.flipped)
    state_seeds = [int(v) for v in jax.tree.leaves(nnx.state(model, BitflipSeed))]
    assert sorted(state_seeds) == sorted(seed for row in other_base for seed in row.seeds)


@pytest.mark.parametrize("rules, message", [
    ({"default": dict(FULL, x_p_exps=0.1)}, r"unknown key\(s\) \['x_p_exps'\]"),
    ({"default": dict(FULL, w_p_frac=1.5)}, r"'default': w_p_frac must be a probability in \(0, 1\)"),
    ({"default": dict(FULL, w_p_frac=0.0)}, r"w_p_frac must be a probability in \(0, 1\)"),
    ({"default": dict(FULL, x_p_exp=-0.1)}, r"x_p_exp must be a probability in \(0, 1\)"),
    ({"default": dict(FULL, x_p_exp=True)}, r"x_p_exp must be a probability in \(0, 1\)"),
    ({"default": dict(FULL, x_p_exp=1e-9)}, r"below the smallest supported flip probability 0.5\*\*24"),
    ({"default": dict(FULL, w_zero_out_t=-1.0)}, r"w_zero_out_t must be a number >= 0"),
    ({"default": dict(FULL, x_zero_out_t=float("nan"))}, r"x_zero_out_t must be a number >= 0"),
    ({"default": dict(FULL, x_seed_exp=2**31)}, r"x_seed_exp must be an int in \[0, 2\*\*31 - 8\)"),
    ({"default": FULL, r"model\.layers\.9\..*": None}, r"'model\\\\.layers\\\\.9\\\\..\*' matches no layer"),
    ({"default": FULL, "q_proj": FULL}, r"'q_proj' matches no layer \(patterns must match a whole layer name\)"),
    ({"default": FULL, "model.layers.(": FULL}, r"is not a valid regex"),
    ({"default": 0.5}, r"must map to a dict of settings or None"),
    ([("default", FULL)], r"must be a mapping"),
])
def test_bad_rules_raise_one_clear_error(model, rules, message):
    with pytest.raises(ValueError, match=message):
        apply_bitflip_rules(model, rules)


def test_bad_seed_mode(model):
    with pytest.raises(ValueError, match="seed_mode must be one of"):
        apply_bitflip_rules(model, {"default": FULL}, seed_mode="random")
