"""A random Llama created one compiled layer at a time is the one created as a whole."""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxflip.models import LlamaForCausalLM, get_flavor
from jaxflip.models.create import create_random_llama, decoder_layer_creator
from jaxflip.models.llama import LlamaDecoderLayer
from jaxflip.models.sharding import create_sharded, make_mesh
from jaxflip.train.collectives import collective_bytes


@pytest.mark.parametrize("tie", [False, True])
def test_layer_by_layer_creation_equals_whole_model_creation(tie):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    mesh = make_mesh(dp=2, fsdp=4)
    config = get_flavor("aixsim-debug", vocab_size=512, num_hidden_layers=3, tie_word_embeddings=tie)
    seed = int(np.random.default_rng().integers(2**31))
    model = create_random_llama(config, mesh, seed)
    reference = create_sharded(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), mesh)
    assert isinstance(model.model.layers, nnx.List) and (model.lm_head is None) == tie
    flat, reference_flat = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reference))
    assert [path for path, _ in flat] == [path for path, _ in reference_flat]
    for (path, variable), (_, expected) in zip(flat, reference_flat):
        assert type(variable) is type(expected), path
        assert variable.get_value().sharding == expected.get_value().sharding, path
        np.testing.assert_array_equal(variable.get_value(), expected.get_value(), err_msg=str(path))
    assert model.model.layers[2].mlp.up_proj.weight[...].sharding.spec == PartitionSpec(None, "fsdp")
    # layers draw distinct keys
    assert not np.array_equal(model.model.layers[0].mlp.up_proj.weight[...], model.model.layers[1].mlp.up_proj.weight[...])


def test_a_decoder_layer_is_born_in_its_fsdp_shards_without_a_collective_or_a_whole_copy():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 8 host devices)")
    mesh = make_mesh(dp=1, fsdp=4, devices=jax.devices()[:4])
    config = get_flavor("aixsim-debug", vocab_size=512, hidden_size=256, intermediate_size=1024)
    seed = int(np.random.default_rng().integers(2**31))
    compiled = decoder_layer_creator(config, mesh).lower(np.int32(seed), np.uint32(0)).compile()
    assert not collective_bytes(compiled.as_text())
    layer_state, _ = compiled.output_shardings
    weights = [(path, sharding) for path, sharding in nnx.to_flat_state(layer_state) if len(sharding.get_value().spec) == 2]
    assert len(weights) == 7 and all("fsdp" in sharding.get_value().spec for _, sharding in weights)  # the Linears
    # each device draws only its shard: its temporaries stay below one whole copy of the layer
    layer = nnx.eval_shape(lambda: LlamaDecoderLayer(config, rngs=nnx.Rngs(0)))
    layer_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 2
