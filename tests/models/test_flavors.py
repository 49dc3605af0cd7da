"""Flavor shapes, parameter counts (against HF models on the meta device and against our own
abstract models) and configs read from HF config.json."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxflip.models import FLAVORS, Llama3RopeScaling, LlamaForCausalLM, config_from_hf, format_param_counts, get_flavor, param_count
from jaxflip.models.flavors import torchtitan_ffn_hidden

# NewComputeBench's registered aixsim ModelArgs and Meta's published Llama-3 shapes:
# (dim, layers, heads, kv heads, FFN hidden, vocab)
EXPECTED_SHAPES = {
    "aixsim-debug": (128, 2, 4, 2, 512, 49152),
    "aixsim-60M": (384, 22, 6, 2, 1408, 49152),
    "aixsim-200M": (768, 24, 12, 4, 2688, 49152),
    "aixsim-400M": (960, 30, 15, 5, 3328, 49152),
    "aixsim-600M": (1152, 32, 18, 6, 4096, 49152),
    "aixsim-1.1B": (1536, 32, 24, 8, 5376, 49152),
    "llama3-8B": (4096, 32, 32, 8, 14336, 128256),
    "llama3.1-8B": (4096, 32, 32, 8, 14336, 128256),
    "llama3-70B": (8192, 80, 64, 8, 28672, 128256),
}


def test_flavor_shapes():
    assert set(FLAVORS) == set(EXPECTED_SHAPES)
    for name, (dim, layers, heads, kv_heads, ffn, vocab) in EXPECTED_SHAPES.items():
        c = FLAVORS[name]
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, c.vocab_size) == (dim, layers, heads, kv_heads, ffn, vocab), name
        assert c.head_dim == dim // heads and not c.tie_word_embeddings
    assert all(FLAVORS[n].rope_theta == 10000.0 and FLAVORS[n].rope_scaling is None for n in FLAVORS if n.startswith("aixsim"))
    assert FLAVORS["llama3.1-8B"].rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert FLAVORS["llama3-8B"].rope_theta == 500000.0 and FLAVORS["llama3-8B"].rope_scaling is None


def test_torchtitan_ffn_rule():
    # 4 * 384 = 1536 -> 2/3: 1024 -> x1.3: 1331 -> multiple of 128: 1408
    assert torchtitan_ffn_hidden(384, 128, 1.3) == 1408
    assert torchtitan_ffn_hidden(4096, 256, None) == 11008  # Llama-2 7B


def hf_config_of(config) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)


@pytest.mark.parametrize("name", list(FLAVORS))
def test_param_count_equals_hf_model_on_meta_device(name):
    config = FLAVORS[name]
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(hf_config_of(config))
    assert param_count(name) == sum(p.numel() for p in hf_model.parameters())
    embedding = config.vocab_size * config.hidden_size
    assert param_count(name, exclude_embedding=True) == param_count(name) - embedding


@pytest.mark.parametrize("name, overrides", [
    ("aixsim-60M", {}), ("aixsim-debug", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    ("llama3-70B", dict(param_dtype="bfloat16")),
])
def test_param_count_equals_our_abstract_model(name, overrides):
    config = get_flavor(name, **overrides)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) == param_count(config)
    assert all(p.dtype == config.jnp_param_dtype for p in params)


def test_param_count_table_lists_every_flavor():
    lines = format_param_counts().splitlines()
    assert len(lines) == 1 + len(FLAVORS)
    row = next(line for line in lines if line.startswith("aixsim-60M "))
    assert f"{param_count('aixsim-60M'):,}" in row and f"{param_count('aixsim-60M', exclude_embedding=True):,}" in row


def test_config_from_hf_config_json(tmp_path):
    """A Llama-3.1-8B config.json as Meta publishes it (transformers-4 keys)."""
    config_json = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    expected = get_flavor("llama3.1-8B", param_dtype="bfloat16")
    assert config_from_hf(tmp_path, param_dtype="bfloat16") == expected
    assert config_from_hf(tmp_path / "config.json", param_dtype="bfloat16") == expected
    assert config_from_hf(config_json, param_dtype="bfloat16") == expected
    # transformers 5 moves RoPE settings into rope_parameters
    assert config_from_hf(transformers.LlamaConfig(**config_json), param_dtype="bfloat16") == expected


def test_config_from_hf_rejects_what_the_model_cannot_run():
    base = dataclasses.asdict(get_flavor("aixsim-debug"))
    base.pop("rope_scaling")
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        config_from_hf(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf(base | {"hidden_act": "gelu"})
