"""Named model flavors with their exact shapes, and parameter counts.

AICrossSim-CLM (``aixsim-*``): NewComputeBench's torchtitan ``ModelArgs`` registered under
model_arch "aixsim" (``src/aixsim_models/llm/model_flavors.py``): Llama-3 blocks, all with
multiple_of 128, ffn_dim_multiplier 1.3, rope_theta 10000, torchtitan's defaults norm_eps 1e-5
and an untied output layer, no RoPE scaling. The vocabulary is the cosmo2 tokenizer's (49152).
``aixsim-600M`` is dim 1152, 32 layers, 18/6 heads and ``aixsim-debug`` dim 128, 2 layers,
4/2 heads, as registered there. ``max_position_embeddings`` is the pretraining sequence
length, 2048.

Llama-3 (``llama3-8B``, ``llama3-70B``) and Llama-3.1 (``llama3.1-8B``: RoPE scaling factor 8,
low 1, high 4, original context 8192) as Meta's HF configs give them.

``python -m jaxflip.models`` prints the parameter counts of every flavor.
"""

from __future__ import annotations

import math

from jaxflip.models.llama_config import Llama3RopeScaling, LlamaConfig


def torchtitan_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan's FeedForward size: 2/3 of 4 * dim, times the multiplier, rounded up to a
    multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _torchtitan_llama(dim, n_layers, n_heads, n_kv_heads, *, vocab_size, multiple_of, ffn_dim_multiplier,
                      rope_theta, max_seq_len, rope_scaling=None) -> dict:
    """``LlamaConfig`` arguments of a torchtitan Llama ``ModelArgs``."""
    return dict(
        vocab_size=vocab_size, hidden_size=dim,
        intermediate_size=torchtitan_ffn_hidden(dim, multiple_of, ffn_dim_multiplier),
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-5, rope_theta=rope_theta, rope_scaling=rope_scaling,
        max_position_embeddings=max_seq_len,
    )


COSMO2_VOCAB_SIZE = 49152
LLAMA3_VOCAB_SIZE = 128256


def _aixsim(dim, n_layers, n_heads, n_kv_heads) -> dict:
    return _torchtitan_llama(dim, n_layers, n_heads, n_kv_heads, vocab_size=COSMO2_VOCAB_SIZE, multiple_of=128,
                             ffn_dim_multiplier=1.3, rope_theta=10000.0, max_seq_len=2048)


_FLAVOR_ARGS = {
    "aixsim-debug": _aixsim(128, 2, 4, 2),
    "aixsim-60M": _aixsim(384, 22, 6, 2),
    "aixsim-200M": _aixsim(768, 24, 12, 4),
    "aixsim-400M": _aixsim(960, 30, 15, 5),
    "aixsim-600M": _aixsim(1152, 32, 18, 6),
    "aixsim-1.1B": _aixsim(1536, 32, 24, 8),
    "llama3-8B": _torchtitan_llama(4096, 32, 32, 8, vocab_size=LLAMA3_VOCAB_SIZE, multiple_of=1024,
                                   ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8B": _torchtitan_llama(4096, 32, 32, 8, vocab_size=LLAMA3_VOCAB_SIZE, multiple_of=1024,
                                     ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=131072,
                                     rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192)),
    "llama3-70B": _torchtitan_llama(8192, 80, 64, 8, vocab_size=LLAMA3_VOCAB_SIZE, multiple_of=4096,
                                    ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
}
FLAVORS: dict[str, LlamaConfig] = {name: LlamaConfig(**args) for name, args in _FLAVOR_ARGS.items()}


def get_flavor(name: str, **changes) -> LlamaConfig:
    """The named flavor's config with some fields changed (e.g. ``param_dtype="bfloat16"``,
    ``vocab_size=...``)."""
    if name not in _FLAVOR_ARGS:
        raise ValueError(f"unknown flavor {name!r}; known: {', '.join(_FLAVOR_ARGS)}")
    return LlamaConfig(**(_FLAVOR_ARGS[name] | changes))


def param_count(flavor: str | LlamaConfig, *, exclude_embedding: bool = False) -> int:
    """Number of parameters, counted from the shapes (nothing is allocated).

    ``exclude_embedding``: leave out the input embedding, as torchtitan's ``get_num_params``
    does; the aixsim flavor names (60M, ..., 1.1B) are these counts."""
    c = get_flavor(flavor) if isinstance(flavor, str) else flavor
    D, F, H = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * H, c.num_key_value_heads * H
    attention = D * q + 2 * D * kv + q * D + (q + 2 * kv + D if c.attention_bias else 0)
    mlp = 3 * D * F + (2 * F + D if c.mlp_bias else 0)
    per_layer = attention + mlp + 2 * D  # two RMSNorms
    embedding = 0 if exclude_embedding else c.vocab_size * D
    head = 0 if c.tie_word_embeddings else c.vocab_size * D
    return c.num_hidden_layers * per_layer + D + embedding + head


def format_param_counts() -> str:
    """A table of every flavor's shape and parameter counts."""
    rows = [f"{'flavor':<13} {'params':>15} {'w/o embedding':>15}  {'dim':>5} {'layers':>6} {'heads/kv':>8} {'ffn':>6}"]
    for name, c in FLAVORS.items():
        heads = f"{c.num_attention_heads}/{c.num_key_value_heads}"
        rows.append(f"{name:<13} {param_count(c):>15,} {param_count(c, exclude_embedding=True):>15,}  "
                    f"{c.hidden_size:>5} {c.num_hidden_layers:>6} {heads:>8} {c.intermediate_size:>6}")
    return "\n".join(rows)
