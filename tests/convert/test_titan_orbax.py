"""torchtitan <-> jaxflip checkpoint, with torchtitan 0.3's own Llama-3 model (aixsim-debug
shapes) saved by torch.distributed.checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from flax import nnx
from hf_models import relative_error
from titan_models import titan_logits, titan_model

from jaxflip.convert.__main__ import main
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import LlamaForCausalLM, get_flavor, load, save
from jaxflip.models.orbax_io import read_config, read_param, stored_params
from jaxflip.models.titan_io import single_process

FLAVOR = "aixsim-debug"
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def legacy_name(name: str) -> str:
    """NewComputeBench's older torchtitan key of a torchtitan 0.3 key."""
    return name.replace("attention.qkv_linear.", "attention.").replace("lm_head.", "output.")


def stored_arrays(path) -> dict[str, np.ndarray]:
    return {name: read_param(shard, name) for name, (shard, _) in stored_params(path).items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A torchtitan model saved with DCP -> titan-to-orbax (flavor told by the shapes) ->
    orbax-to-titan."""
    rng = np.random.default_rng()
    folder = tmp_path_factory.mktemp("titan")
    model = titan_model(get_flavor(FLAVOR), rng)
    with single_process():
        dcp.save(model.state_dict(), checkpoint_id=folder / "dcp", no_dist=True)
    assert main(["titan-to-orbax", str(folder / "dcp"), str(folder / "orbax")]) == 0
    assert main(["orbax-to-titan", str(folder / "orbax"), str(folder / "dcp_back")]) == 0
    return model, folder, rng


def test_the_flavor_is_told_by_the_shapes(converted):
    _, folder, _ = converted
    assert read_config(folder / "orbax")[0] == get_flavor(FLAVOR)


def test_flax_logits_equal_torchtitan_logits(converted):
    model, folder, rng = converted
    tokens = rng.integers(0, model.config.vocab_size, (2, 24))
    ours = np.asarray(load(folder / "orbax")(jnp.asarray(tokens)))
    assert relative_error(ours, titan_logits(model, tokens)) < 1e-4


def test_torchtitan_loads_identical_tensors_back(converted):
    model, folder, rng = converted
    reloaded = titan_model(get_flavor(FLAVOR), rng)
    state = reloaded.state_dict()
    with single_process():
        dcp.load(state, checkpoint_id=folder / "dcp_back", no_dist=True)
    reloaded.load_state_dict(state)
    original = model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_legacy_torch_save_file_converts_to_the_same_checkpoint(converted, tmp_path):
    """NewComputeBench's key names, in a torch.save file of {"model": state_dict}."""
    model, folder, _ = converted
    torch.save({"model": {legacy_name(name): tensor for name, tensor in model.state_dict().items()}}, tmp_path / "model.pt")
    assert main(["titan-to-orbax", str(tmp_path / "model.pt"), str(tmp_path / "orbax"), "--flavor", FLAVOR]) == 0
    expected = stored_arrays(folder / "orbax")
    for name, array in stored_arrays(tmp_path / "orbax").items():
        assert np.array_equal(array, expected[name]), name


def test_training_checkpoint_with_prefixed_model_keys_converts(converted, tmp_path):
    """Older torchtitan training checkpoints: model keys under ``model.``, next to optimizer
    and step state, which are left out."""
    model, folder, _ = converted
    state = model.state_dict()
    optimizer = {"state": {name: {"exp_avg": torch.zeros_like(tensor)} for name, tensor in state.items()}}
    training = {"model": state, "optimizer": optimizer, "train_state": {"step": torch.tensor(7)}}
    with single_process():
        dcp.save(training, checkpoint_id=tmp_path / "step-7", no_dist=True)
    assert main(["titan-to-orbax", str(tmp_path / "step-7"), str(tmp_path / "orbax")]) == 0
    expected = stored_arrays(folder / "orbax")
    for name, array in stored_arrays(tmp_path / "orbax").items():
        assert np.array_equal(array, expected[name]), name


def test_legacy_key_names_are_written_and_read_back(converted, tmp_path):
    _, folder, _ = converted
    assert main(["orbax-to-titan", str(folder / "orbax"), str(tmp_path / "legacy"), "--key-names", "legacy"]) == 0
    keys = set(dcp.FileSystemReader(tmp_path / "legacy").read_metadata().state_dict_metadata)
    assert {"output.weight", "layers.1.attention.wq.weight"} <= keys and "lm_head.weight" not in keys
    assert main(["titan-to-orbax", str(tmp_path / "legacy"), str(tmp_path / "orbax")]) == 0
    expected = stored_arrays(folder / "orbax")
    for name, array in stored_arrays(tmp_path / "orbax").items():
        assert np.array_equal(array, expected[name]), name


def test_a_written_dcp_folder_reads_back_alone(tmp_path):
    """The quickstart's model (aixsim-debug widths, the built-in tokenizer's 4096 tokens: no
    flavor has those shapes) -> orbax-to-titan -> titan-to-orbax with no flags: the config
    and the tokenizer travel beside the DCP files."""
    config = get_flavor(FLAVOR, vocab_size=4096)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(2**31))))
    save(model, tmp_path / "orbax", tokenizer_dir=builtin_tokenizer_dir())
    assert main(["orbax-to-titan", str(tmp_path / "orbax"), str(tmp_path / "dcp")]) == 0
    assert main(["titan-to-orbax", str(tmp_path / "dcp"), str(tmp_path / "back")]) == 0
    assert read_config(tmp_path / "back")[0] == config
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").read_bytes() == (
        builtin_tokenizer_dir() / "tokenizer.json").read_bytes()
    expected = stored_arrays(tmp_path / "orbax")
    for name, array in stored_arrays(tmp_path / "back").items():
        assert np.array_equal(array, expected[name]), name


@pytest.mark.parametrize("flags", [[], ["--flavor", FLAVOR]], ids=["shapes", "flavor"])
def test_the_vocabulary_is_the_embeddings(tmp_path, flags):
    """torchtitan sizes the embedding by its tokenizer, not by the flavor's default."""
    vocab = int(np.random.default_rng().integers(1000, 5000))
    model = titan_model(get_flavor(FLAVOR, vocab_size=vocab), np.random.default_rng())
    with single_process():
        dcp.save(model.state_dict(), checkpoint_id=tmp_path / "dcp", no_dist=True)
    assert main(["titan-to-orbax", str(tmp_path / "dcp"), str(tmp_path / "orbax"), *flags]) == 0
    assert read_config(tmp_path / "orbax")[0] == get_flavor(FLAVOR, vocab_size=vocab)
