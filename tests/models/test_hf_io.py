"""Loading an HF Llama folder as a model: the older torch.save layout, the stored dtype kept."""

import jax.numpy as jnp
import numpy as np
import torch
from hf_models import hf_logits, random_hf_model, random_tokens, relative_error, save_hf_folder, tiny_hf_config

from jaxflip.models.hf_io import load_hf_model
from jaxflip.models.tensor_io import torch_to_numpy


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
