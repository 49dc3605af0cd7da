"""Loading HF Llama weights as a model: a state dict that does not fit is refused, the older
torch.save layout streams in, the stored dtype is kept, each tensor lands in its FSDP shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import hf_logits, random_hf_model, random_tokens, relative_error, save_hf_folder, tiny_hf_config

from jaxflip.models.hf_io import llama_from_hf_state_dict, load_hf_model
from jaxflip.models.named_params import flat_params, param_state
from jaxflip.models.sharding import make_mesh, state_shardings
from jaxflip.models.tensor_io import torch_to_numpy


def test_loader_rejects_state_dicts_that_do_not_fit():
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    state_dict = dict(hf_model.state_dict())
    state_dict["model.final_norm"] = state_dict.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['model.final_norm'\]"):
        llama_from_hf_state_dict(hf_model.config, state_dict)
    state_dict = dict(hf_model.state_dict())
    state_dict["lm_head.weight"] = state_dict["lm_head.weight"][:-1]
    with pytest.raises(ValueError, match=r"'lm_head.weight': HF tensor has shape \(95, 64\), the model expects \(96, 64\)"):
        llama_from_hf_state_dict(hf_model.config, state_dict)


def test_load_hf_model_streams_a_pytorch_model_bin(tmp_path):
    """The older torch.save layout, read memory-mapped with weights_only=True."""
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    save_hf_folder(hf_model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model, tokenizer_dir = load_hf_model(tmp_path)
    tokens = random_tokens(rng, hf_model.config, (2, 16))
    assert relative_error(np.asarray(model(jnp.asarray(tokens))), hf_logits(hf_model, tokens)) < 1e-4
    assert tokenizer_dir == tmp_path


def test_load_hf_model_keeps_bfloat16(tmp_path):
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng()).to(torch.bfloat16)
    save_hf_folder(hf_model, tmp_path)
    model, _ = load_hf_model(tmp_path)
    weight = model.model.layers[1].mlp.up_proj.weight[...]
    assert weight.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(weight), torch_to_numpy(hf_model.model.layers[1].mlp.up_proj.weight))


def test_load_hf_model_puts_each_tensor_in_its_shard(tmp_path):
    """With a mesh, every parameter lands in its FSDP layout; a tensor above the block size
    (the embedding here) is read per device slice, a block of rows at a time."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    save_hf_folder(hf_model, tmp_path, max_shard_size="60KB")
    mesh = make_mesh(dp=2, fsdp=4)
    model, _ = load_hf_model(tmp_path, mesh=mesh, row_block_bytes=4096)
    loaded = flat_params(param_state(model))
    expected = flat_params(state_shardings(param_state(model), mesh))
    assert not loaded["model.embed_tokens.weight"].sharding.is_fully_replicated  # the rules shard it
    for name, tensor in hf_model.state_dict().items():
        value = loaded[name]
        assert value.sharding.is_equivalent_to(expected[name], value.ndim), name
        assert all(shard.data.shape == expected[name].shard_shape(value.shape) for shard in value.addressable_shards)
        assert np.array_equal(np.asarray(value), torch_to_numpy(tensor)), name
