"""jaxflip.models.save / load: the one model checkpoint (config, sharded Orbax params, tokenizer)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import BitFlipLoRALinear, LoRAParam, add_lora
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import LlamaForCausalLM, get_flavor, load, save
from jaxflip.models.named_params import flat_params, param_state
from jaxflip.models.orbax_io import METADATA_FILE, PARAMS_DIR, stored_params, tokenizer_path
from jaxflip.models.sharding import make_mesh, state_shardings

DEBUG = get_flavor("aixsim-debug", vocab_size=512)


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


def test_round_trip_is_exact(saved):
    model, path = saved
    original, restored = params_of(model), params_of(load(path))
    assert sorted(restored) == sorted(original)
    for name, array in original.items():
        assert restored[name].dtype == array.dtype and np.array_equal(restored[name], array), name


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
