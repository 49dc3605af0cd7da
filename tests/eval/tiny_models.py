"""Tiny random models for the eval tests, over the built-in tokenizer's vocabulary."""

import numpy as np
from hf_models import flax_twin, random_hf_model, tiny_hf_config

from jaxflip.data import builtin_tokenizer_dir
from jaxflip.data.builtin_corpus import VOCAB_SIZE
from jaxflip.models import save


def tiny_text_model(rng: np.random.Generator, *, param_dtype: str = "float32"):
    """``(hf_model, model)``: a random tiny HF Llama and its jaxflip twin."""
    config = tiny_hf_config()
    config.vocab_size = VOCAB_SIZE
    hf_model = random_hf_model(config, rng)
    return hf_model, flax_twin(hf_model, param_dtype=param_dtype)


def save_checkpoint(model, path) -> str:
    """``model`` as a jaxflip checkpoint with the built-in tokenizer."""
    return str(save(model, path, tokenizer_dir=builtin_tokenizer_dir()))
