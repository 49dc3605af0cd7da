"""jaxflip.models.save / load: the one model checkpoint (config, sharded Orbax params, tokenizer)."""

import json
import re
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax._src.array import ArrayImpl

from jaxflip.bitflip import BitFlipLoRALinear, LoRAParam, add_lora
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import LlamaForCausalLM, get_flavor, load, save
from jaxflip.models.named_params import flat_params, param_state
from jaxflip.models.orbax_io import (CHUNKS_PER_BLOCK, LARGE_PARAMS_DIR, METADATA_FILE, PARAMS_DIR, config_to_dict, lora_settings,
                                     stored_params, tokenizer_path)
from jaxflip.models.sharding import make_mesh, state_shardings
from jaxflip.models.tensor_io import rows_per_block

DEBUG = get_flavor("aixsim-debug", vocab_size=512)
BLOCK_BYTES = 32 << 10  # below the debug model's larger weights (embedding, MLP, q/o): they take the row-block path


def random_lora_model(rng: np.random.Generator) -> LlamaForCausalLM:
    """Every parameter random, LoRA factors included (a fresh adapter's B is zero)."""
    model = LlamaForCausalLM(DEBUG, rngs=nnx.Rngs(int(rng.integers(2**31))))
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(0))
    randomised = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype), param_state(model))
    nnx.update(model, randomised)
    return model


def params_of(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in flat_params(param_state(model)).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_lora_model(np.random.default_rng())
    path = save(model, tmp_path_factory.mktemp("checkpoint") / "model", tokenizer_dir=builtin_tokenizer_dir(),
                max_shard_bytes=300_000)
    return model, path


@pytest.fixture(scope="module")
def saved_in_blocks(saved, tmp_path_factory):
    model, _ = saved
    return model, save(model, tmp_path_factory.mktemp("blocks") / "model", row_block_bytes=BLOCK_BYTES)


def assert_exact(restored: dict, original: dict) -> None:
    assert sorted(restored) == sorted(original)
    for name, array in original.items():
        assert restored[name].dtype == array.dtype and np.array_equal(restored[name], array), name


def test_params_larger_than_a_block_are_stored_in_row_blocks(saved_in_blocks):
    model, path = saved_in_blocks
    original = params_of(model)
    large = {name for name, (location, _) in stored_params(path).items() if location.parent.name == LARGE_PARAMS_DIR}
    assert large == {name for name, array in original.items() if array.nbytes > BLOCK_BYTES}
    for name in large:
        chunks = [file for file in (path / LARGE_PARAMS_DIR / name / "c").rglob("*") if file.is_file()]
        shape, dtype = original[name].shape, original[name].dtype
        chunk_rows = max(1, rows_per_block(shape, dtype, BLOCK_BYTES) // CHUNKS_PER_BLOCK)
        assert len(chunks) == math.ceil(shape[0] / chunk_rows) > 1


def test_row_block_round_trip_is_exact(saved_in_blocks):
    model, path = saved_in_blocks
    assert_exact(params_of(load(path)), params_of(model))


def test_sharded_load_puts_each_device_slice_of_a_large_param_in_place(saved_in_blocks):
    model, path = saved_in_blocks
    mesh = make_mesh(dp=2, fsdp=4)
    restored = flat_params(param_state(load(path, mesh=mesh)))
    expected = flat_params(state_shardings(param_state(load(path, mesh=mesh)), mesh))
    embedding = restored["model.embed_tokens.weight"]
    assert not embedding.sharding.is_fully_replicated  # the rules shard it: FSDP over the model dimension
    for name, value in restored.items():
        assert value.sharding.is_equivalent_to(expected[name], value.ndim), name
        for shard in value.addressable_shards:
            assert shard.data.shape == expected[name].shard_shape(value.shape), name
    assert_exact({name: np.asarray(value) for name, value in restored.items()}, params_of(model))


def test_a_sharded_model_is_written_from_its_shards(saved_in_blocks, tmp_path, monkeypatch):
    """Each device's shard goes to disk from that device (as in a training run's export): no
    array spread over several devices is ever copied to the host whole."""
    model, _ = saved_in_blocks
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, make_mesh(dp=2, fsdp=4))))
    assert not sharded.model.embed_tokens.weight[...].sharding.is_fully_replicated
    gathered = []
    to_host = ArrayImpl.__array__
    monkeypatch.setattr(ArrayImpl, "__array__", lambda self, *args, **kwargs: (
        gathered.append(self.shape) if len(self.sharding.device_set) > 1 else None) or to_host(self, *args, **kwargs))
    path = save(sharded, tmp_path / "model", row_block_bytes=BLOCK_BYTES)
    assert gathered == []
    monkeypatch.undo()
    assert_exact(params_of(load(path)), params_of(model))


def test_a_version_2_checkpoint_still_loads(saved_in_blocks, tmp_path):
    """Version 2 (before large_params/): every parameter in Orbax shards."""
    model, _ = saved_in_blocks
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "v2" / PARAMS_DIR / "00000", params_of(model))
    checkpointer.wait_until_finished()
    metadata = {"format": "jaxflip-llama", "version": 2, "config": config_to_dict(model.config),
                "lora": lora_settings(model)}
    (tmp_path / "v2" / METADATA_FILE).write_text(json.dumps(metadata))
    assert_exact(params_of(load(tmp_path / "v2")), params_of(model))


def test_round_trip_is_exact(saved):
    model, path = saved
    assert_exact(params_of(load(path)), params_of(model))


def test_lora_structure_is_restored(saved):
    _, path = saved
    restored = load(path)
    q_proj = restored.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, BitFlipLoRALinear) and (q_proj.rank, q_proj.alpha) == (4, 8.0)
    assert isinstance(q_proj.lora_A, LoRAParam)
    assert not isinstance(restored.lm_head, BitFlipLoRALinear)  # add_lora's default skips the head


def test_shards_stay_under_the_limit_unless_one_tensor_is_larger(saved):
    model, path = saved
    shards = {}
    for name, (shard, _) in stored_params(path).items():
        shards.setdefault(shard, []).append(name)
    assert len(shards) > 1
    sizes = {name: value.nbytes for name, value in params_of(model).items()}
    for shard, names in shards.items():
        shard_bytes = sum(sizes[name] for name in names)
        assert shard_bytes <= 300_000 or len(names) == 1, (shard.name, shard_bytes)


def test_tokenizer_files_travel_with_the_model(saved):
    _, path = saved
    original = (builtin_tokenizer_dir() / "tokenizer.json").read_bytes()
    assert (tokenizer_path(path) / "tokenizer.json").read_bytes() == original


def test_bfloat16_override(saved):
    model, path = saved
    restored = load(path, param_dtype="bfloat16")
    assert restored.config.param_dtype == restored.config.dtype == "bfloat16"
    for name, array in params_of(model).items():
        ours = params_of(restored)[name]
        assert ours.dtype == jnp.bfloat16 and np.array_equal(ours, array.astype(jnp.bfloat16)), name


def test_sharded_restore_places_each_parameter_in_its_shard(saved):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    model, path = saved
    mesh = make_mesh(dp=2, fsdp=4)
    restored = load(path, mesh=mesh)
    expected = flat_params(state_shardings(param_state(restored), mesh))
    original = params_of(model)
    for name, value in flat_params(param_state(restored)).items():
        assert value.sharding.is_equivalent_to(expected[name], value.ndim), name
        assert np.array_equal(np.asarray(value), original[name]), name


def test_save_refuses_an_existing_path_and_overwrite_replaces_it(tmp_path):
    rng = np.random.default_rng()
    first, second = random_lora_model(rng), random_lora_model(rng)
    save(first, tmp_path / "model")
    with pytest.raises(FileExistsError, match="model exists; pass overwrite=True to replace it$"):
        save(second, tmp_path / "model")
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.array_equal(params_of(load(tmp_path / "model"))[name], params_of(first)[name])
    save(second, tmp_path / "model", overwrite=True)
    assert np.array_equal(params_of(load(tmp_path / "model"))[name], params_of(second)[name])
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_saved_folder_gets_the_mode_of_any_new_folder(saved, tmp_path):
    """Not tempfile's private 0700 (its staging folder is renamed into place)."""
    _, path = saved
    (tmp_path / "plain").mkdir()
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_load_rejects_params_that_disagree_with_the_config(saved, tmp_path):
    _, path = saved
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["config"]["intermediate_size"] = 384
    (tmp_path / PARAMS_DIR).symlink_to(path / PARAMS_DIR)
    (tmp_path / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="the config expects"):
        load(tmp_path)


def test_load_refuses_an_integer_tensor_instead_of_casting_it(saved, tmp_path):
    """A checkpoint written by hand (or by another tool) with an integer parameter: loading it
    would cast it to the model's float dtype and run as other weights, so it is refused."""
    model, _ = saved
    params = params_of(model)
    name = sorted(params)[np.random.default_rng().integers(len(params))]
    params[name] = np.random.default_rng().integers(-100, 100, params[name].shape, dtype=np.int32)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ints" / PARAMS_DIR / "00000", params)
    checkpointer.wait_until_finished()
    metadata = {"format": "jaxflip-llama", "version": 3, "config": config_to_dict(model.config),
                "lora": lora_settings(model)}
    (tmp_path / "ints" / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=re.escape(name) + ".* hold int32 values, not floating point"):
        load(tmp_path / "ints")
