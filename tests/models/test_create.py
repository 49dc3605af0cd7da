"""A random Llama created one compiled layer at a time is the one created as a whole."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxflip.models import LlamaForCausalLM, get_flavor
from jaxflip.models.create import create_random_llama
from jaxflip.models.sharding import create_sharded, make_mesh


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
