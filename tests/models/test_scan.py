"""Stacked decoder layers: the scan computes and flips what the Python loop does, the stacked
layout round-trips to the public one, and layers that differ stay a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxflip.bitflip import BitflipSeed, apply_bitflip_rules, named_linears
from jaxflip.models import LlamaForCausalLM, get_flavor
from jaxflip.models.scan import StackedLayers, stack_layers, unstack_layers
from jaxflip.models.sharding import create_sharded, make_mesh

CONFIG = get_flavor("aixsim-debug", vocab_size=512, num_hidden_layers=3)
# No fraction flips on activations: the scan and the loop compute them in another fusion order,
# and a fraction flip XORs a mantissa bit, so a 1-ulp difference whose carry reaches that bit
# becomes a difference of 2**bit ulps (seen: 24 of 65,536 gradient elements off, once). Weights
# are the same bits in both, so their fraction flips agree exactly.
FLIP = dict(x_p_exp=0.5**10, x_p_frac=None, x_zero_out_t=30.0, w_p_exp=0.5**10, w_p_frac=0.5**6, w_zero_out_t=1.25)
# one Linear per layer flips (each flipped tensor costs about a second of XLA compile on CPU,
# per layer in the loop): the same settings in every layer, so the layers stay identical
EVERY_DOWN_PROJ = {r"model\.layers\.\d+\.mlp\.down_proj": FLIP}


def flipped_model(rules=EVERY_DOWN_PROJ) -> LlamaForCausalLM:
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(int(np.random.default_rng().integers(2**31))))
    apply_bitflip_rules(model, rules, seed_mode="independent", base_seed=int(np.random.default_rng().integers(100)))
    return model


def flat_values(state) -> dict:
    return {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(state)}


# "dots" is slow-only: the remat policy wraps the same scanned body (tests/train/test_step.py runs
# remat policies through whole steps)
@pytest.mark.parametrize("remat", ["none", pytest.param("dots", marks=pytest.mark.slow)])
def test_scanned_layers_give_the_losses_gradients_and_flips_of_the_loop(remat):
    unrolled = flipped_model()
    start = flat_values(nnx.state(unrolled, BitflipSeed))
    scanned = nnx.clone(unrolled)
    assert stack_layers(scanned) and isinstance(scanned.model.layers, StackedLayers)
    tokens = jnp.asarray(np.random.default_rng().integers(0, CONFIG.vocab_size, (2, 17)))

    @nnx.jit
    def loss_and_grads(model):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1).mean()

        return nnx.value_and_grad(loss_fn)(model)

    for model in (unrolled, scanned):
        model.model.set_remat(remat)
    for _ in range(2):  # the second call flips with the seeds the first one advanced
        loss, grads = loss_and_grads(unrolled)
        scanned_loss, scanned_grads = loss_and_grads(scanned)
        np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
        stacked_grads = scanned_grads["model"]["layers"]["layer"]
        for i in range(CONFIG.num_hidden_layers):
            expected, got = flat_values(grads["model"]["layers"][i]), flat_values(stacked_grads)
            assert expected.keys() == got.keys()
            for path in expected:
                # float32 rounding of another fusion order, relative to the gradient's scale
                # (seen up to 2e-4 of it on CPU); other flips would move gradients by far more
                scale = np.abs(expected[path]).max()
                np.testing.assert_allclose(got[path][i], expected[path], rtol=1e-3, atol=1e-3 * scale,
                                           err_msg=str(path))
    unstack_layers(scanned)
    seeds, unrolled_seeds = flat_values(nnx.state(scanned, BitflipSeed)), flat_values(nnx.state(unrolled, BitflipSeed))
    assert seeds.keys() == unrolled_seeds.keys()
    assert all(seeds[path] == unrolled_seeds[path] for path in seeds)
    assert any(seeds[path] != start[path] for path in seeds if path[-2] == "down_proj"), "the flips should run"


def test_stack_then_unstack_gives_back_the_sharded_model():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    mesh = make_mesh(dp=2, fsdp=4)
    model = create_sharded(flipped_model, mesh)
    original = flat_values(nnx.state(model))
    specs = {path: v.get_value().sharding.spec for path, v in nnx.to_flat_state(nnx.state(model))}
    names = list(named_linears(model))

    assert stack_layers(model)
    layer = model.model.layers.layer
    assert model.model.layers.count == CONFIG.num_hidden_layers
    assert layer.mlp.gate_proj.weight[...].shape == (CONFIG.num_hidden_layers, CONFIG.intermediate_size,
                                                    CONFIG.hidden_size)
    assert layer.mlp.gate_proj.weight[...].sharding.spec == PartitionSpec(None, None, "fsdp")
    assert layer.mlp.gate_proj.weight.get_metadata()["out_sharding"] == (None, "mlp", "embed")
    assert isinstance(layer.mlp.down_proj.x_seed_exp, BitflipSeed)
    np.testing.assert_array_equal(layer.self_attn.o_proj.weight[...][1],
                                  original[("model", "layers", 1, "self_attn", "o_proj", "weight")])

    unstack_layers(model)
    assert isinstance(model.model.layers, nnx.List) and list(named_linears(model)) == names
    restored = flat_values(nnx.state(model))
    assert restored.keys() == original.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=str(path))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        assert variable.get_value().sharding.spec == specs[path], path
    assert model.model.layers[2].mlp.up_proj.weight.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_layers_with_different_flips_stay_a_loop():
    model = flipped_model({r"model\.layers\.1\.mlp\.down_proj": FLIP})
    assert not stack_layers(model)
    assert isinstance(model.model.layers, nnx.List) and len(model.model.layers) == CONFIG.num_hidden_layers
    assert model.model.layers[1].mlp.down_proj.x_flip.enabled
