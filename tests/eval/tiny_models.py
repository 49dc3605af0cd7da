"""Tiny random models for the eval tests, over the built-in tokenizer's vocabulary."""

import json
from pathlib import Path

import numpy as np
from hf_models import flax_twin, random_hf_model, tiny_hf_config

from jaxflip.data import builtin_tokenizer_dir
from jaxflip.data.builtin_corpus import VOCAB_SIZE
from jaxflip.models import save
from jaxflip.train.__main__ import QUICKSTART
from jaxflip.train.train_config import load_config, to_dict


def tiny_text_model(rng: np.random.Generator, *, param_dtype: str = "float32"):
    """``(hf_model, model)``: a random tiny HF Llama and its jaxflip twin."""
    config = tiny_hf_config()
    config.vocab_size = VOCAB_SIZE
    hf_model = random_hf_model(config, rng)
    return hf_model, flax_twin(hf_model, param_dtype=param_dtype)


def save_checkpoint(model, path) -> str:
    """``model`` as a jaxflip checkpoint with the built-in tokenizer."""
    return str(save(model, path, tokenizer_dir=builtin_tokenizer_dir()))


def as_training_run(folder: Path) -> Path:
    """``folder``, holding a model in ``model/``, given the files a training run writes beside
    it: ``config.json`` (the training config, not an HF one) and ``metrics.jsonl``."""
    (folder / "config.json").write_text(json.dumps(to_dict(load_config(QUICKSTART)), default=str))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float(np.log(VOCAB_SIZE))}) + "\n")
    return folder
