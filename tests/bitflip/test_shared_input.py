"""``flip_shared_input``: Linears that read one tensor and flip it alike from equal seeds (q/k/v,
gate/up under mase-triton's reference seeds) flip it once, with the same values, gradients and
seeds after as when each flips it itself (gradients up to rounding); ``apply_rule_table`` marks only such Linears."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflip.bitflip import apply_bitflip_rules, named_linears
from jaxflip.kernels_pallas.random_bitflip import FLIPPED_NAME
from jaxflip.models import LlamaConfig, LlamaForCausalLM
from jaxflip.train.program_stats import executed_count

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
# probabilities high enough that every flipped tensor of this tiny model has flipped elements
FLIPS = dict(x_p_exp=0.5**4, x_p_frac=0.5**3, x_zero_out_t=30.0, w_p_exp=0.5**5, w_p_frac=0.5**3, w_zero_out_t=1.0)


def marked(model) -> set[str]:
    return {name for name, linear in named_linears(model).items() if linear.x_seeds_shared}


def test_reference_seeds_mark_each_block_and_independent_seeds_none():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    apply_bitflip_rules(model, {"default": FLIPS})
    assert marked(model) == set(named_linears(model)) - {"lm_head"}
    apply_bitflip_rules(model, {"default": FLIPS}, seed_mode="independent", base_seed=3)
    assert marked(model) == set()


def test_a_sibling_with_other_seeds_unmarks_its_block_only():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    apply_bitflip_rules(model, {r"model\.layers\.0\.self_attn\.q_proj": FLIPS | dict(x_seed_exp=9), "default": FLIPS})
    assert not marked(model) & {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"} <= marked(model)


def test_a_shared_input_flip_runs_once_with_the_same_values_gradients_and_seeds():
    config = dataclasses.replace(CONFIG, num_hidden_layers=1)  # one block shows it; two compiled twice as long
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)))
    rules = {"default": FLIPS | dict(x_seed_exp=int(rng.integers(1000)), x_seed_frac=int(rng.integers(1000)))}
    models = [LlamaForCausalLM(config, rngs=nnx.Rngs(seed)) for _ in range(2)]
    for model in models:
        apply_bitflip_rules(model, rules)
    for linear in named_linears(models[1]).values():
        linear.x_seeds_shared = False  # each Linear flips its own input
    loss_and_grads = nnx.value_and_grad(lambda model: jnp.mean(jnp.square(model(tokens))))
    step = nnx.jit(loss_and_grads)

    def flips_per_step(model):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda state: loss_and_grads(nnx.merge(graphdef, state)))(state)
        return executed_count(jaxpr.jaxpr, "name", name=FLIPPED_NAME)

    flips = [flips_per_step(model) for model in models]
    # per layer: q/k/v's input once instead of 3 times, gate/up's once instead of twice
    assert flips[1] - flips[0] == 3 * config.num_hidden_layers
    for _ in range(2):  # the seeds after the first step start the second
        (loss, grads), (reference_loss, reference_grads) = step(models[0]), step(models[1])
        assert loss == reference_loss
        # the shared input's gradient adds q/k/v's (gate/up's) before the keep mask, not after:
        # the same up to float32 rounding
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        assert [linear.seeds() for linear in named_linears(models[0]).values()] == \
            [linear.seeds() for linear in named_linears(models[1]).values()]
    clean = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    assert loss != jnp.mean(jnp.square(clean(tokens))), "the flips should show"
