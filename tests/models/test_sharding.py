"""Logical axis annotations and their mapping to a (dp, fsdp) mesh of 8 host devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import flax_twin, random_hf_model, random_tokens, tiny_hf_config
from jax.sharding import NamedSharding, PartitionSpec

from jaxflip.bitflip import BitflipSeed, LoRAParam, add_lora, apply_bitflip_rules
from jaxflip.models import LlamaForCausalLM, get_flavor, llama_from_hf_state_dict
from jaxflip.models.sharding import (LOGICAL_AXIS_RULES, array_from_device_slices, create_sharded, logical_sharding, make_mesh,
                                     model_mesh, on_model_mesh, state_shardings)
from jaxflip.train.collectives import collective_bytes

DEBUG = get_flavor("aixsim-debug", vocab_size=512)


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    return make_mesh(dp=2, fsdp=4)


def lora_model():
    model = LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(0))
    add_lora(model, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
    return model


def test_every_parameter_names_its_axes():
    model = nnx.eval_shape(lora_model)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(variable.shape), path
        assert all(axis in LOGICAL_AXIS_RULES for axis in axes), (path, axes)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.get_metadata()["out_sharding"] == ("heads", "embed")
    assert q_proj.lora_A.get_metadata()["out_sharding"] == ("lora_rank", "embed")
    assert model.model.layers[0].mlp.down_proj.weight.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_shardings_follow_the_table(mesh):
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(0)))
    specs = {path: variable.get_value().spec
             for path, variable in nnx.to_flat_state(state_shardings(nnx.state(abstract), mesh))}
    assert specs[("model", "embed_tokens", "weight")] == PartitionSpec(None, "fsdp")
    assert specs[("model", "layers", 1, "mlp", "down_proj", "weight")] == PartitionSpec("fsdp", None)
    assert specs[("model", "layers", 1, "self_attn", "k_proj", "weight")] == PartitionSpec(None, "fsdp")
    assert specs[("model", "norm", "weight")] == PartitionSpec(None)
    assert specs[("model", "layers", 0, "self_attn", "q_proj", "x_seed_exp")] == PartitionSpec()
    assert logical_sharding(mesh, ("batch", "length")).spec == PartitionSpec(("dp", "fsdp"), None)
    # a dimension that does not divide over its mesh axes stays whole
    assert logical_sharding(mesh, ("embed",), shape=(6,)).spec == PartitionSpec(None)


def test_sharded_model_runs_and_matches_the_unsharded_one(mesh):
    """With flips on: they are keyed on global element indices, so sharding does not move them.
    (One block flips: every flipped tensor costs about a second of XLA compile time on CPU.)"""
    sharded = create_sharded(lambda: LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(3)), mesh)
    unsharded = LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(3))
    weight = sharded.model.layers[0].mlp.gate_proj.weight[...]
    assert weight.sharding.spec == PartitionSpec(None, "fsdp")
    assert weight.addressable_shards[0].data.shape == (DEBUG.intermediate_size, DEBUG.hidden_size // 4)
    assert isinstance(sharded.model.layers[0].mlp.gate_proj.x_seed_exp, BitflipSeed)
    tokens = np.random.default_rng().integers(0, DEBUG.vocab_size, (8, 16))
    batch = jax.device_put(tokens, logical_sharding(mesh, ("batch", "length")))
    forward = nnx.jit(lambda model, tokens: model(tokens))
    clean_logits = np.asarray(forward(unsharded, jnp.asarray(tokens)))
    scale = np.abs(clean_logits).max()
    # sharded matmuls sum in another order: float32 rounding, relative to the logits' scale
    # (seen up to 2e-4 of it on CPU); the flips below move logits by more than 1e-2 of it
    np.testing.assert_allclose(forward(sharded, batch), clean_logits, rtol=1e-3, atol=1e-3 * scale)

    rules = {r"model\.layers\.0\.mlp\..*": dict(x_p_exp=0.5**8, x_p_frac=0.5**14, x_zero_out_t=30.0,
                                                 w_p_exp=0.5**8, w_p_frac=0.5**14, w_zero_out_t=0.05)}
    for model in (sharded, unsharded):
        apply_bitflip_rules(model, rules, seed_mode="independent", base_seed=5)
    logits = np.asarray(forward(sharded, batch))
    reference = np.asarray(forward(unsharded, jnp.asarray(tokens)))
    np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-3 * scale)
    assert np.abs(logits - clean_logits).max() > 1e-2 * scale, "the flips should show"


def test_hf_weights_load_straight_into_their_shards(mesh):
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    model = llama_from_hf_state_dict(hf_model.config, hf_model.state_dict(), mesh=mesh)
    assert model.model.layers[1].self_attn.o_proj.weight[...].sharding.spec == PartitionSpec("fsdp", None)
    tokens = random_tokens(rng, hf_model.config, (2, 8))
    np.testing.assert_allclose(model(jnp.asarray(tokens)), flax_twin(hf_model)(jnp.asarray(tokens)), rtol=1e-5, atol=1e-5)


def test_lora_model_is_created_sharded(mesh):
    model = create_sharded(lora_model, mesh)
    lora_b = model.model.layers[0].mlp.down_proj.lora_B[...]
    assert isinstance(model.model.layers[0].mlp.down_proj.lora_B, LoRAParam)
    assert lora_b.sharding.spec == PartitionSpec("fsdp", None) and not np.any(lora_b)


def test_on_its_mesh_each_device_flips_its_own_shard(mesh, monkeypatch):
    """The Pallas kernel (interpret mode, as on GPU) under ``on_model_mesh``: the forward
    flips what the one-device forward flips, and moves no more than the weights' gathers (a
    flip that XLA could not partition would gather its input and every activation)."""
    monkeypatch.setenv("JAXFLIP_BITFLIP_BACKEND", "interpret")
    sharded = create_sharded(lambda: LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(4)), mesh)
    unsharded = LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(4))
    # no activation fraction flips: they amplify the sharded forward's rounding (tests/models/test_scan.py)
    rules = {r"model\.layers\.1\.mlp\.down_proj": dict(x_p_exp=0.5**8, x_p_frac=None, x_zero_out_t=30.0,
                                                        w_p_exp=0.5**8, w_p_frac=0.5**10, w_zero_out_t=0.05)}
    for model in (sharded, unsharded):
        apply_bitflip_rules(model, rules, seed_mode="independent", base_seed=7)
    assert model_mesh(sharded) is mesh and model_mesh(unsharded) is None
    tokens = jnp.asarray(np.random.default_rng().integers(0, DEBUG.vocab_size, (16, 128)))
    forward = nnx.jit(lambda model, tokens: model(tokens))
    with on_model_mesh(sharded):
        logits = np.asarray(forward(sharded, tokens))
        hlo = forward.lower(sharded, tokens).compile().as_text()
    reference = np.asarray(forward(unsharded, tokens))
    scale = np.abs(reference).max()
    # An activation within rounding of a power of two has a different exponent in the two
    # forwards, so the same exponent flip scales it by 4x differently: allow that in a few
    # tokens. A flip of the wrong elements (local instead of global indices) changes most tokens.
    token_error = np.abs(logits - reference).max(axis=-1)
    clean = np.asarray(forward(LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(4)), tokens))
    assert np.mean(np.abs(clean - reference).max(axis=-1) > 1e-3 * scale) > 0.5, "the rule flips too little"
    assert np.sum(token_error > 1e-3 * scale) <= 4, np.sort(token_error)[-8:]
    assert sharded.model.layers[1].mlp.down_proj.seeds() == unsharded.model.layers[1].mlp.down_proj.seeds()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(unsharded, nnx.Param)))
    moved = collective_bytes(hlo)
    assert sum(moved.values()) <= 1.2 * param_bytes, dict(moved)


@pytest.mark.parametrize("spec, distinct", [(PartitionSpec(None, "fsdp"), 4), (PartitionSpec(), 1)])
def test_a_slice_held_by_several_devices_is_read_once(mesh, spec, distinct):
    """On dp x fsdp, the dp replicas of an FSDP slice (and every device of a replicated array)
    take the one read of their slice: a checkpoint's bytes are read once per distinct slice."""
    source = np.random.default_rng().standard_normal((6, 16)).astype(np.float32)
    reads = []

    def read(index):
        reads.append(index)
        return source[index]

    array = array_from_device_slices(source.shape, NamedSharding(mesh, spec), read)
    assert len(reads) == distinct
    assert array.sharding.spec == spec and np.array_equal(np.asarray(array), source)
