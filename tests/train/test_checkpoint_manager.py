"""Train checkpoints: the data position beside each, pruning, fallback, faults during a save."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


SAVE_FAULTS = Path(__file__).parent / "save_faults.py"


def faulty_saves(output_dir, point: str, step: int, fault: str, *, keep: int, steps: int, seed: int):
    """The saves of steps 1..steps in a process of their own, ``fault`` striking at ``point``
    of the save of ``step`` (``save_faults.py``)."""
    import jaxflip

    return subprocess.run([sys.executable, str(SAVE_FAULTS), point, str(step), fault, "saves", str(output_dir),
                           str(keep), str(steps), str(seed)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(Path(jaxflip.__file__).parents[1])})  # this jaxflip


def restored_latest(output_dir, keep: int, seed: int):
    """``(step, state, position)`` of the newest complete checkpoint, read by a fresh process's
    checkpointer; the state checked against the one saved at its step."""
    from save_faults import saved_state

    like = jax.tree.map(jnp.asarray, saved_state(seed, 1))
    checkpointer = Checkpointer(output_dir, keep=keep, async_save=True)
    step, state, position = checkpointer.restore_latest(*abstract_and_shardings(like))
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, state, saved_state(seed, step))
    return step, position


# the newest complete checkpoint when the process is killed at a point of the save of step 3
KILLED_AT = {"prune": 2, "position": 2, "writing": 2, "commit": 2, "finished": 3}


@pytest.mark.parametrize("point", [pytest.param(point, marks=() if point in ("commit", "finished") else pytest.mark.slow)
                                   for point in KILLED_AT])  # ~3 s each: two in the default suite
def test_a_sigkill_during_a_save_resumes_from_the_newest_complete_checkpoint(point, tmp_path):
    """keep 1, SIGKILL at a point of the async save of step 3: the newest complete checkpoint
    restores bit-exactly with its data position, and after the resume it is the one kept."""
    seed = int(np.random.default_rng().integers(2**31))
    killed = faulty_saves(tmp_path, point, 3, "kill", keep=1, steps=4, seed=seed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    step, position = restored_latest(tmp_path, keep=1, seed=seed)
    assert (step, position) == (KILLED_AT[point], {"position": KILLED_AT[point]})
    assert [name for name in step_folders(tmp_path) if name.isdigit()] == [str(step)]


def test_a_disk_that_fills_during_an_async_save_is_one_line_and_the_previous_checkpoint_stays(tmpfs):
    """The disk fills once the data position of step 2 is written: Orbax's writer threads meet
    ENOSPC. The process prints the error's one line and nothing else (no Orbax log, no
    tensorstore report); step 1 restores."""
    disk = tmpfs(2**22)
    output_dir = disk / "run"
    seed = int(np.random.default_rng().integers(2**31))
    failed = faulty_saves(output_dir, "position", 2, str(disk / "filler"), keep=2, steps=3, seed=seed)
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [failed.stderr.strip()]
    assert "No space left on device: checkpoint step 2 could not be saved" in failed.stderr
    assert str(output_dir) in failed.stderr
    assert step_folders(output_dir) == ["1"]
    (disk / "filler").unlink()
    assert restored_latest(output_dir, keep=2, seed=seed) == (1, {"position": 1})
