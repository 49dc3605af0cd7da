"""torchtitan 0.3's own Llama-3 model at a jaxflip flavor's size, with fresh random weights.

Its attention backend (flex attention) is compiled by torch.compile on first use, ~20 s on a
CPU; the tests run the eager ``flex_attention`` instead (the same function, uncompiled)."""

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

from hf_models import randomize_parameters
from jaxflip.models import LlamaConfig

FlexAttention._compiled_flex_attn = flex_attention


def titan_model(config: LlamaConfig, rng: np.random.Generator) -> Llama3Model:
    """A torchtitan ``Llama3Model`` of ``config``'s shapes; every parameter random, norms
    included (torchtitan initialises them to 1, which would hide a mix-up)."""
    assert config.rope_scaling is None and not config.tie_word_embeddings
    dim, vocab, heads = config.hidden_size, config.vocab_size, config.num_attention_heads
    titan_config = Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim, eps=config.rms_norm_eps),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=_build_llama3_layers(
            n_layers=config.num_hidden_layers, dim=dim, n_heads=heads, n_kv_heads=config.num_key_value_heads,
            hidden_dim=config.intermediate_size, attn_backend="flex",
            rope=ComplexRoPE.Config(dim=config.head_dim, max_seq_len=config.max_position_embeddings,
                                    theta=config.rope_theta)),
    )
    return randomize_parameters(titan_config.build(), rng)


def titan_logits(model: Llama3Model, tokens: np.ndarray) -> np.ndarray:
    tokens = torch.from_numpy(tokens)
    positions = torch.arange(tokens.shape[1]).repeat(tokens.shape[0], 1)
    with torch.no_grad():
        return model(tokens, attention_masks=model.get_attention_masks(positions)).numpy()
