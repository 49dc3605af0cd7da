import numpy as np
import pytest

from tiny_models import save_checkpoint, tiny_text_model


@pytest.fixture
def checkpoint(tmp_path):
    """``(path, hf_model)``: a fresh random tiny model saved as a jaxflip checkpoint with the
    built-in tokenizer, and the HF model holding the same weights."""
    hf_model, model = tiny_text_model(np.random.default_rng())
    return save_checkpoint(model, tmp_path / "model"), hf_model
