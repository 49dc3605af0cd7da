"""The data position beside each train checkpoint: one file for every process count."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxflip.train.checkpoint_manager import DATA_STATE_FILE, Checkpointer

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


def random_state(rng):
    return {"w": jnp.asarray(rng.standard_normal(64), jnp.float32), "b": {"x": jnp.asarray(rng.standard_normal(3))}}


def abstract_and_shardings(state):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    return abstract, shardings


def step_folders(output_dir) -> list[str]:
    """Every step folder Orbax has there, finalized or still being written."""
    return sorted(p.name for p in (output_dir / "checkpoints").iterdir() if p.name.split(".")[0].isdigit())


def test_a_save_cut_short_leaves_the_only_complete_checkpoint_resumable(tmp_path, monkeypatch):
    """keep 1, killed during an async save: the previous checkpoint and its data position are there."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng()
    first = random_state(rng)
    checkpointer = Checkpointer(tmp_path, keep=1, async_save=True)
    checkpointer.save(1, first, {"position": 1})
    checkpointer.wait()
    # the process dies before Orbax finalizes step 2: nothing of the finalization runs
    monkeypatch.setattr(ocp.CheckpointManager, "_finalize", lambda self, step, steps_to_remove: None)
    checkpointer.save(2, random_state(rng), {"position": 2})
    monkeypatch.undo()

    resumed = Checkpointer(tmp_path, keep=1, async_save=True)
    assert resumed.latest_step() == 1
    state, position = resumed.restore(1, *abstract_and_shardings(first))
    np.testing.assert_array_equal(state["w"], first["w"])
    assert position == {"position": 1}
    resumed.close()


def test_no_more_than_keep_checkpoints_exist_while_a_save_finishes(tmp_path, monkeypatch):
    """A kill at any moment of a save leaves at most ``keep`` checkpoints: counted when Orbax
    begins to finalize each save, the newest one included."""
    import orbax.checkpoint as ocp

    counts = []
    finalize = ocp.CheckpointManager._finalize

    def counting_finalize(self, step, steps_to_remove):
        counts.append(len(step_folders(tmp_path)))
        return finalize(self, step, steps_to_remove)

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize", counting_finalize)
    checkpointer = Checkpointer(tmp_path, keep=2, async_save=True)
    rng = np.random.default_rng()
    for step in range(1, 5):
        checkpointer.save(step, random_state(rng), {"position": step})
    checkpointer.close()
    assert len(counts) == 4 and max(counts) <= 2
    assert step_folders(tmp_path) == ["3", "4"]
    assert sorted(p.name for p in (tmp_path / "data_state").iterdir()) == ["3", "4"]


def corrupt_largest_file(folder):
    """Random bytes over the largest array data file (``default/d/``) of a checkpoint."""
    largest = max((folder / "default" / "d").iterdir(), key=lambda p: p.stat().st_size)
    largest.write_bytes(np.random.default_rng().bytes(largest.stat().st_size))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    rng = np.random.default_rng()
    states = {step: random_state(rng) for step in (1, 2)}
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    for step, state in states.items():
        checkpointer.save(step, state, {"position": step})
    checkpointer.close()
    corrupt_largest_file(tmp_path / "checkpoints" / "2")
    capsys.readouterr()

    resumed = Checkpointer(tmp_path, keep=3, async_save=False)
    step, state, position = resumed.restore_latest(*abstract_and_shardings(states[1]))
    assert (step, position) == (1, {"position": 1})
    np.testing.assert_array_equal(state["w"], states[1]["w"])
    said = capsys.readouterr().out.strip()
    assert "\n" not in said and "checkpoint step 2 cannot be restored" in said and "resuming from step 1" in said
    assert (tmp_path / "checkpoints_unreadable" / "2").is_dir()
    # the step is saved again, not skipped as already there
    resumed.save(2, states[2], {"position": 2})
    resumed.close()
    assert Checkpointer(tmp_path, keep=3, async_save=False).latest_step() == 2


def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_is_one_line(tmp_path):
    import pytest

    from jaxflip.train.checkpoint_manager import CheckpointError

    state = random_state(np.random.default_rng())
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    checkpointer.save(1, state, {"position": 1})
    checkpointer.close()
    corrupt_largest_file(tmp_path / "checkpoints" / "1")
    with pytest.raises(CheckpointError, match="checkpoint step 1 .* cannot be restored") as raised:
        Checkpointer(tmp_path, keep=3, async_save=False).restore_latest(*abstract_and_shardings(state))
    assert "\n" not in str(raised.value)
    assert step_folders(tmp_path) == ["1"]


def test_a_full_disk_is_one_os_error_naming_the_step_and_leaves_nothing_of_the_save(tmpfs):
    """On a 1 MiB disk, a 4 MiB state: ENOSPC from tensorstore's writer thread."""
    import errno

    import pytest

    output_dir = tmpfs(2**20)
    checkpointer = Checkpointer(output_dir, keep=2, async_save=True)
    state = {"w": jnp.asarray(np.random.default_rng().standard_normal(2**20), jnp.float32)}
    with pytest.raises(OSError) as raised:
        checkpointer.save(1, state, {"position": 1})
        checkpointer.wait()
    assert raised.value.errno == errno.ENOSPC and "checkpoint step 1 could not be saved" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert step_folders(output_dir) == [] and list((output_dir / "data_state").iterdir()) == []
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
