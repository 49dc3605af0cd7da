"""open_checkpoint: a jaxflip checkpoint and an HF folder of the same weights open as the same model."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import HF_FOLDER_KINDS, random_hf_folder, random_tokens

from jaxflip.models import open_checkpoint, save
from jaxflip.models.hf_io import load_hf_model


@pytest.fixture(scope="module", params=HF_FOLDER_KINDS)
def round_trip(request, tmp_path_factory):
    """An HF folder with fresh random weights, and the jaxflip checkpoint of the same model."""
    rng = np.random.default_rng()
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = random_hf_folder(request.param, folder / "hf", rng)
    model, tokenizer_dir = load_hf_model(folder / "hf")
    save(model, folder / "orbax", tokenizer_dir=tokenizer_dir)
    return hf_model, folder, rng


def test_open_checkpoint_opens_both_kinds(round_trip):
    hf_model, folder, rng = round_trip
    tokens = jnp.asarray(random_tokens(rng, hf_model.config, (1, 12)))
    from_orbax, orbax_tokenizer = open_checkpoint(folder / "orbax")
    from_hf, hf_tokenizer = open_checkpoint(folder / "hf")
    np.testing.assert_array_equal(np.asarray(from_orbax(tokens)), np.asarray(from_hf(tokens)))
    assert (orbax_tokenizer, hf_tokenizer) == (folder / "orbax" / "tokenizer", folder / "hf")
