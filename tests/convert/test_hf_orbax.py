"""HF transformers <-> jaxflip checkpoint: logits, bit-exact round trips, what transformers loads."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import (HF_FOLDER_KINDS, hf_logits, random_hf_folder, random_hf_model, random_tokens, relative_error,
                       save_hf_folder, tiny_hf_config)
from safetensors.numpy import load_file

from jaxflip.convert.__main__ import main
from jaxflip.convert.hf_orbax import hf_to_orbax, orbax_to_hf
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import load
from jaxflip.models.named_params import flat_params, param_state
from jaxflip.models.orbax_io import LARGE_PARAMS_DIR, read_config, read_param, stored_params
from jaxflip.models.safetensors_io import SafetensorsSource
from jaxflip.models.tensor_io import torch_to_numpy


def hf_tensors(folder) -> dict[str, np.ndarray]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors |= load_file(file)
    return tensors


def original_tensors(model) -> dict[str, np.ndarray]:
    """The HF model's parameters, without the tied head (it is the embedding)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return {name: torch_to_numpy(tensor) for name, tensor in state.items()}


@pytest.fixture(scope="module", params=HF_FOLDER_KINDS)
def round_trip(request, tmp_path_factory):
    """An HF model -> hf-to-orbax -> orbax-to-hf, with fresh random weights."""
    rng = np.random.default_rng()
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = random_hf_folder(request.param, folder / "hf", rng)
    assert main(["hf-to-orbax", str(folder / "hf"), str(folder / "orbax"), "--max-shard-size", "100KB"]) == 0
    assert main(["orbax-to-hf", str(folder / "orbax"), str(folder / "hf_back"), "--max-shard-size", "100KB"]) == 0
    return hf_model, folder, rng


def test_flax_logits_equal_hf_logits(round_trip):
    hf_model, folder, rng = round_trip
    tokens = random_tokens(rng, hf_model.config, (2, 24))
    ours = np.asarray(load(folder / "orbax")(jnp.asarray(tokens)))
    assert relative_error(ours, hf_logits(hf_model, tokens)) < 1e-4


def test_back_to_hf_is_bit_exact(round_trip):
    hf_model, folder, _ = round_trip
    original, converted = original_tensors(hf_model), hf_tensors(folder / "hf_back")
    assert sorted(converted) == sorted(original)
    for name, array in original.items():
        assert converted[name].dtype == array.dtype and np.array_equal(converted[name], array), name


def test_transformers_loads_the_converted_folder(round_trip):
    hf_model, folder, rng = round_trip
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf_back", attn_implementation="eager")
    tokens = random_tokens(rng, hf_model.config, (2, 24))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_transformers_loads_the_tokenizer(round_trip):
    _, folder, _ = round_trip
    text = "Call me Ishmael. Some years ago, never mind how long precisely"
    expected = transformers.AutoTokenizer.from_pretrained(builtin_tokenizer_dir())(text)["input_ids"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "hf_back")
    assert tokenizer(text)["input_ids"] == expected
    config = transformers.AutoConfig.from_pretrained(folder / "hf_back")  # generate reads its special tokens here
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert config.eos_token_id is not None


def test_bfloat16_conversion_rounds_like_torch(tmp_path):
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    save_hf_folder(hf_model, tmp_path / "hf")
    assert main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--dtype", "bfloat16"]) == 0
    assert read_config(tmp_path / "orbax")[0].param_dtype == "bfloat16"
    stored = stored_params(tmp_path / "orbax")
    for name, tensor in hf_model.state_dict().items():
        expected = torch_to_numpy(tensor.to(torch.bfloat16))
        assert np.array_equal(read_param(stored[name][0], name).view(np.uint16), expected.view(np.uint16)), name


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_large_tensors_convert_a_block_of_rows_at_a_time_bit_exact(tmp_path, monkeypatch, dtype):
    """A tiny block size forces the row-block path of 70B-wide tensors: never read whole,
    stored in their own arrays, bit for bit what torch's cast gives, back to HF unchanged."""
    block_bytes = 4096
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    save_hf_folder(hf_model, tmp_path / "hf", max_shard_size="60KB")
    expected = {name: torch_to_numpy(tensor if dtype == "keep" else tensor.to(torch.bfloat16))
                for name, tensor in hf_model.state_dict().items()}
    read_whole = []
    original_read = SafetensorsSource.read
    monkeypatch.setattr(SafetensorsSource, "read", lambda self, name: read_whole.append(name) or original_read(self, name))
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype=dtype, row_block_bytes=block_bytes)
    stored = stored_params(tmp_path / "orbax")
    large = {name for name, (location, _) in stored.items() if location.parent.name == LARGE_PARAMS_DIR}
    assert large == {name for name, array in expected.items() if array.nbytes > block_bytes}
    assert "model.embed_tokens.weight" in large and not large & set(read_whole)
    for name, array in expected.items():
        assert np.array_equal(read_param(stored[name][0], name).view(np.uint8), array.view(np.uint8)), name
    loaded = flat_params(param_state(load(tmp_path / "orbax")))
    for name, array in expected.items():
        assert np.array_equal(np.asarray(loaded[name]).view(np.uint8), array.view(np.uint8)), name
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf_back")
    back = hf_tensors(tmp_path / "hf_back")
    for name, array in expected.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array), name


def test_overwrite_replaces_the_destination(tmp_path):
    hf_model = random_hf_model(tiny_hf_config(), np.random.default_rng())
    save_hf_folder(hf_model, tmp_path / "hf")
    (tmp_path / "orbax").mkdir()
    (tmp_path / "orbax" / "stale.txt").write_text("from before")
    assert main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--overwrite"]) == 0
    assert not (tmp_path / "orbax" / "stale.txt").exists() and (tmp_path / "orbax" / "jaxflip_model.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orbax"]
