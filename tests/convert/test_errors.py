"""Bad input: one ``error:`` line, exit status 2, and no DST (nor a half-written one beside it)."""

import json

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hf_models import random_hf_model, tiny_hf_config
from safetensors.numpy import load_file, save_file
from titan_models import titan_model

from jaxflip.convert.__main__ import main
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import get_flavor
from jaxflip.models.checkpoint_folder import copy_tokenizer_files
from jaxflip.models.orbax_io import CheckpointWriter
from jaxflip.models.titan_io import read_dcp_metadata, single_process


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny HF model folder with fresh random weights, in its own folder ``tmp_path/hf``."""
    folder = tmp_path / "hf"
    random_hf_model(tiny_hf_config(), np.random.default_rng()).save_pretrained(folder)
    copy_tokenizer_files(builtin_tokenizer_dir(), folder)
    return folder


def fails(argv, capsys) -> str:
    """Run the CLI, expecting failure; returns its one error line."""
    capsys.readouterr()  # what the set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def nothing_written(tmp_path, *kept) -> bool:
    return sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def edit_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_source(tmp_path, capsys):
    assert "no such file or folder" in fails(["hf-to-orbax", str(tmp_path / "absent"), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path)


def test_hub_id_that_cannot_be_downloaded(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in CI
    capsys.readouterr()
    assert main(["hf-to-orbax", "no-such-org/no-such-model", str(tmp_path / "dst")]) == 1  # the network, not the input
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    assert error.endswith("the hub cannot be reached (HF_HUB_OFFLINE is set); download it once online or pass a "
                          "local folder")
    assert nothing_written(tmp_path)


def test_missing_config(hf_folder, tmp_path, capsys):
    (hf_folder / "config.json").unlink()
    assert "no config.json" in fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_missing_weight_shard(tmp_path, capsys):
    folder = tmp_path / "hf"
    random_hf_model(tiny_hf_config(), np.random.default_rng()).save_pretrained(folder, max_shard_size="60KB")
    next(folder.glob("model-00002-of-*.safetensors")).unlink()
    assert "which is not there" in fails(["hf-to-orbax", str(folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_shape_disagreeing_with_config(hf_folder, tmp_path, capsys):
    edit_config(hf_folder, intermediate_size=128)
    error = fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert "mlp" in error and "the config expects" in error
    assert nothing_written(tmp_path, "hf")


def test_unknown_key(hf_folder, tmp_path, capsys):
    extra = {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}
    edit_weights(hf_folder, lambda weights: weights.update(extra))
    assert "unexpected model.layers.0.self_attn.q_norm.weight" in fails(
        ["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_missing_key(hf_folder, tmp_path, capsys):
    edit_weights(hf_folder, lambda weights: weights.pop("model.layers.1.mlp.down_proj.weight"))
    assert "missing model.layers.1.mlp.down_proj.weight" in fails(
        ["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_non_llama_architecture(hf_folder, tmp_path, capsys):
    edit_config(hf_folder, architectures=["MistralForCausalLM"], model_type="mistral")
    assert "not a Llama model" in fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_existing_destination_is_left_alone(hf_folder, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    error = fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert error == f"error: {tmp_path / 'dst'} exists; pass --overwrite to replace it"  # the CLI's flag
    assert [path.name for path in (tmp_path / "dst").iterdir()] == ["keep.txt"]


def test_interrupted_conversion_leaves_nothing(hf_folder, tmp_path, monkeypatch):
    """Ctrl-C (or any failure) in the middle of writing: the staging folder goes too."""
    added = []

    def add_then_interrupt(self, name, value):
        added.append(name)
        if len(added) == 5:
            raise KeyboardInterrupt
        return original_add(self, name, value)

    original_add = CheckpointWriter.add
    monkeypatch.setattr(CheckpointWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst"), "--max-shard-size", "10KB"])
    assert nothing_written(tmp_path, "hf")


@pytest.fixture(scope="module")
def titan_state():
    return titan_model(get_flavor("aixsim-debug"), np.random.default_rng()).state_dict()


@pytest.fixture(scope="module")
def titan_dcp(titan_state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("titan") / "step-10"
    with single_process():
        dcp.save(titan_state, checkpoint_id=folder, no_dist=True)
    return folder


def test_titan_folder_without_metadata_points_to_a_step(titan_dcp, tmp_path, capsys):
    error = fails(["titan-to-orbax", str(titan_dcp.parent), str(tmp_path / "dst")], capsys)
    assert "no .metadata" in error and "step-10" in error
    assert nothing_written(tmp_path)


def test_titan_flavor_with_other_shapes(titan_dcp, tmp_path, capsys):
    error = fails(["titan-to-orbax", str(titan_dcp), str(tmp_path / "dst"), "--flavor", "aixsim-60M"], capsys)
    assert "tensors do not fit the config: missing model.layers.10." in error
    assert nothing_written(tmp_path)


def test_titan_shapes_of_no_known_flavor(titan_state, tmp_path, capsys):
    one_layer = {name: tensor for name, tensor in titan_state.items() if not name.startswith("layers.1.")}
    torch.save({"model": one_layer}, tmp_path / "model.pt")
    error = fails(["titan-to-orbax", str(tmp_path / "model.pt"), str(tmp_path / "dst")], capsys)
    assert "no known flavor" in error and "--flavor" in error
    assert nothing_written(tmp_path, "model.pt")


def test_titan_unknown_key(titan_state, tmp_path, capsys):
    torch.save(titan_state | {"layers.0.attention.q_norm.weight": torch.ones(32)}, tmp_path / "model.pt")
    error = fails(["titan-to-orbax", str(tmp_path / "model.pt"), str(tmp_path / "dst"), "--flavor", "aixsim-debug"], capsys)
    assert "unexpected layers.0.attention.q_norm.weight" in error
    assert nothing_written(tmp_path, "model.pt")


def test_not_a_torch_file(tmp_path, capsys):
    (tmp_path / "model.pt").write_text("not a checkpoint")
    error = fails(["titan-to-orbax", str(tmp_path / "model.pt"), str(tmp_path / "dst")], capsys)
    assert "cannot be read as a torch.save file" in error
    assert nothing_written(tmp_path, "model.pt")


class WritesMarker:
    """What a crafted pickle can do when unpickled: call anything, here ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.fixture
def small_dcp(tmp_path):
    folder = tmp_path / "step-1"
    with single_process():
        dcp.save({"tok_embeddings.weight": torch.randn(8, 4)}, checkpoint_id=folder, no_dist=True)
    return folder


def test_dcp_metadata_with_code_is_refused_and_the_code_does_not_run(small_dcp, tmp_path, capsys):
    import pickle

    metadata = read_dcp_metadata(small_dcp)
    metadata.planner_data = WritesMarker(tmp_path / "marker")  # hidden inside a genuine Metadata
    (small_dcp / ".metadata").write_bytes(pickle.dumps(metadata))
    error = fails(["titan-to-orbax", str(small_dcp), str(tmp_path / "dst")], capsys)
    assert "cannot read the DCP metadata" in error and "posix.mkdir" in error
    assert not (tmp_path / "marker").exists()
    assert nothing_written(tmp_path, "step-1")


def test_dcp_metadata_that_is_not_metadata_is_refused(small_dcp, tmp_path, capsys):
    import pickle

    (small_dcp / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": [1, 2]}))
    assert "holds a dict, not a Metadata" in fails(["titan-to-orbax", str(small_dcp), str(tmp_path / "dst")], capsys)
    (small_dcp / ".metadata").write_bytes(b"\x80\x04truncated")
    assert "cannot read the DCP metadata" in fails(["titan-to-orbax", str(small_dcp), str(tmp_path / "dst")], capsys)


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


EMBEDDING = "model.embed_tokens.weight"


@pytest.mark.parametrize("content, message", [
    (safetensors_bytes({}, length=2**62), "a header of 4611686018427387904 bytes"),
    (safetensors_bytes([1, 2]), "the header is a list"),
    (safetensors_bytes({EMBEDDING: {"dtype": "F32", "shape": [2, 2]}}, bytes(16)), "no valid data_offsets"),
    (safetensors_bytes({EMBEDDING: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 2**40]}}, bytes(16)),
     "no valid data_offsets within the file's 16 data bytes"),
    (safetensors_bytes({EMBEDDING: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)),
     "takes 16 bytes, not the"),
    (safetensors_bytes({EMBEDDING: {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)),
     "no valid shape"),
    (safetensors_bytes({EMBEDDING: [1]}), "header entry model.embed_tokens.weight is not a table"),
])
def test_absurd_safetensors_headers(hf_folder, tmp_path, capsys, content, message):
    (hf_folder / "model.safetensors").write_bytes(content)
    assert message in fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert nothing_written(tmp_path, "hf")


def test_truncated_distcp(titan_dcp, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(titan_dcp, tmp_path / "step-10")
    data = next(folder.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    error = fails(["titan-to-orbax", str(folder), str(tmp_path / "dst")], capsys)
    assert "cannot read" in error
    assert nothing_written(tmp_path, "step-10")


def test_an_integer_weight_is_refused_not_cast(hf_folder, tmp_path, capsys):
    rng = np.random.default_rng()
    name = "model.layers.1.mlp.up_proj.weight"

    def to_integers(weights):
        weights[name] = rng.integers(-100, 100, weights[name].shape, dtype=np.int32)

    edit_weights(hf_folder, to_integers)
    error = fails(["hf-to-orbax", str(hf_folder), str(tmp_path / "dst")], capsys)
    assert f"{name} hold int32 values, not floating point" in error
    assert nothing_written(tmp_path, "hf")


@pytest.mark.parametrize("disk, message", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_a_full_or_read_only_disk_is_the_environment_exit_1(disk, message, hf_folder, tmpfs, capsys):
    destination = tmpfs(2**16, read_only=disk == "read-only")
    capsys.readouterr()
    assert main(["hf-to-orbax", str(hf_folder), str(destination / "dst")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(destination.iterdir()) == []
