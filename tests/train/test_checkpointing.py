"""The data position beside each train checkpoint: one file for every process count."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxflip.train.checkpointing import DATA_STATE_FILE, Checkpointer

POSITION = {"epoch": 1, "dataset": {"examples_iterable": {"shard_idx": 0, "shard_example_idx": 7}}, "carry": [5, 9]}


def saved_checkpoint(output_dir):
    checkpointer = Checkpointer(output_dir, keep=2, async_save=False)
    state = {"w": jnp.arange(4.0)}
    checkpointer.save(1, state, POSITION)
    checkpointer.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    return checkpointer, abstract, shardings


def test_the_data_position_is_one_file_and_resumes_with_the_state(tmp_path):
    checkpointer, abstract, shardings = saved_checkpoint(tmp_path)
    assert [p.name for p in (tmp_path / "data_state" / "1").iterdir()] == [DATA_STATE_FILE]
    state, position = checkpointer.restore(1, abstract, shardings)
    np.testing.assert_array_equal(state["w"], np.arange(4.0))
    assert position == POSITION
    checkpointer.close()


def test_a_single_process_checkpoint_of_the_per_process_layout_still_resumes(tmp_path):
    checkpointer, abstract, shardings = saved_checkpoint(tmp_path)
    folder = tmp_path / "data_state" / "1"
    (folder / DATA_STATE_FILE).rename(folder / "process_0.json")
    assert checkpointer.restore(1, abstract, shardings)[1] == POSITION
    checkpointer.close()


def test_a_checkpoint_holding_arrays_the_state_no_longer_has_still_resumes(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=False)
    rng = np.random.default_rng()
    kept, dropped = rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    checkpointer.save(4, {"w": jnp.asarray(kept), "frozen": jnp.asarray(dropped)}, POSITION)
    checkpointer.close()
    reopened = Checkpointer(tmp_path, keep=2, async_save=False)  # a new run: a fresh Orbax manager
    abstract = {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}
    state, _ = reopened.restore(4, abstract, {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    assert list(state) == ["w"]
    np.testing.assert_array_equal(state["w"], kept)
    reopened.close()
