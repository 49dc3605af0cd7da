"""Tiny HF transformers Llama models with fresh random weights, built in-process."""

import numpy as np
import torch
import transformers

from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import config_from_hf, llama_from_hf_state_dict
from jaxflip.models.checkpoint_folder import copy_tokenizer_files


def tiny_hf_config(*, tie: bool = False, bias: bool = False) -> transformers.LlamaConfig:
    """GQA (4 query heads over 2 key/value heads) and Llama-3.1 RoPE scaling whose three
    frequency bands (kept, smoothed, slowed) all occur at head_dim 16."""
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, attn_implementation="eager",
    )


def randomize_parameters(model: torch.nn.Module, rng: np.random.Generator) -> torch.nn.Module:
    """Every parameter random, norms included (inits that leave them at 1 would hide a
    mix-up), scaled so that attention and logits are far from uniform."""
    torch.manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.15)
    return model.eval()


def random_hf_model(config: transformers.LlamaConfig, rng: np.random.Generator) -> transformers.LlamaForCausalLM:
    return randomize_parameters(transformers.LlamaForCausalLM(config), rng)


def save_hf_folder(model, folder, *, max_shard_size=None):
    """``save_pretrained`` (sharded when ``max_shard_size`` is given) plus the repository's
    offline tokenizer."""
    model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    copy_tokenizer_files(builtin_tokenizer_dir(), folder)
    return folder


HF_FOLDER_KINDS = ["single", "sharded", "tied"]  # one safetensors file, an indexed set, a tied head


def random_hf_folder(kind: str, folder, rng: np.random.Generator) -> transformers.LlamaForCausalLM:
    """A tiny HF model with fresh random weights saved in ``folder`` as ``kind`` says; the model."""
    hf_model = random_hf_model(tiny_hf_config(tie=kind == "tied"), rng)
    save_hf_folder(hf_model, folder, max_shard_size="60KB" if kind == "sharded" else None)
    assert (folder / "model.safetensors.index.json").is_file() == (kind == "sharded")
    return hf_model


def random_tokens(rng: np.random.Generator, config, shape) -> np.ndarray:
    return rng.integers(0, config.vocab_size, shape)


def flax_twin(hf_model: transformers.LlamaForCausalLM, **dtypes):
    """Our model holding the HF model's tensors."""
    return llama_from_hf_state_dict(config_from_hf(hf_model.config, **dtypes), hf_model.state_dict())


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens).to(hf_model.device)).logits.float().cpu().numpy()


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
