"""Train checkpoints: Orbax, async, the last N kept, resumed exactly.

A checkpoint holds the ``TrainState`` it is given (the loop gives it the step, trained
weights, bitflip seeds and optimizer state; the frozen weights, never trained, are rebuilt
from their source on resume) as one flat dict keyed by pytree path, restored straight into its
shardings (with scanned layers, the stacked layout: a run resumes with the layout it saved, which
the same config chooses again); and the data stream's position
(``<output_dir>/data_state/<step>/stream.json``, written before the Orbax save begins so that a
finished checkpoint always has its data position). Every process reads the same stream
(``jaxflip.data.pipeline``), so process 0 writes the one position and any number of processes
resume from it: a checkpoint of a two-process run resumes in one process with the same
devices, and back.

A checkpoint is complete when Orbax has finalized it and its data position is there. Old ones
are pruned here, not by Orbax (which drops them from its list as soon as a newer save starts):
only complete ones count, and a save starts only after pruning to ``keep - 1``, so a kill at
any point leaves the newest complete checkpoint (and, ``keep`` > 1, at most ``keep`` of them).
A latest checkpoint that does not restore (a corrupt file) is moved to
``checkpoints_unreadable/`` and the run resumes from the newest one that does, saying so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxflip.cli import one_line, os_error_code, quiet_reported_os_faults
from jaxflip.train.step import TrainState

DATA_STATE_FILE = "stream.json"
UNREADABLE_DIR = "checkpoints_unreadable"
# what a run keeps in its output_dir, besides config.json (which a new run rewrites)
RUN_STATE_DIRS = ("checkpoints", UNREADABLE_DIR, "data_state", "tensorboard", "model")
RUN_STATE_FILES = ("metrics.jsonl", "loss.png")


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be restored; the message (one line) says why."""


def flatten(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict, like):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(path)] for path, _ in paths])


class Checkpointer:
    def __init__(self, output_dir: Path, *, keep: int, async_save: bool):
        self.directory = Path(output_dir).absolute() / "checkpoints"
        self.data_directory = Path(output_dir).absolute() / "data_state"
        self.keep = keep
        self._barriers = itertools.count()
        self._in_flight = None  # the step of a save that may still be running
        quiet_reported_os_faults()  # a save's OS fault is one OSError (_failing_save), not Orbax's tracebacks
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
        # the handler named: a fresh manager then reads a checkpoint's tree metadata (restore)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> None:
        self._finish()  # what the save below waits for anyway: the previous one is complete
        self._prune(self.keep - 1)
        self._in_flight = step
        with self._failing_save(step):
            self._write_data_state(step, data_state)
            self.manager.save(step, args=ocp.args.StandardSave(flatten(state)), force=force)

    def _finish(self) -> None:
        with self._failing_save(self._in_flight):
            self.manager.wait_until_finished()
        self._in_flight = None

    @contextlib.contextmanager
    def _failing_save(self, step: int | None):
        """An OS fault in a save (disk full, no permission; tensorstore reports it inside a
        ``ValueError``, from a background thread when async) becomes one ``OSError`` naming the
        step, and what the save wrote is removed."""
        try:
            yield
        except Exception as error:
            code = os_error_code(error)
            if code is None or step is None:
                raise
            self._settle()
            self._discard(step)
            raise OSError(code, f"{os.strerror(code)}: checkpoint step {step} could not be saved in "
                                f"{self.directory.parent} (what it wrote is removed)") from None

    def _settle(self) -> None:
        """Wait for every thread of a failed save, so that none writes after ``_discard`` or
        into a closing interpreter: Orbax's finalizing thread can fail (its metadata file) while
        its checkpointer's threads still write the arrays, which the manager's wait leaves be."""
        writers = getattr(self.manager, "_checkpointer", None)  # Orbax's AsyncCheckpointer; no public handle
        for wait in (self.manager.wait_until_finished, getattr(writers, "wait_until_finished", None)):
            if wait is not None:
                with contextlib.suppress(Exception):  # the save's fault again, or another of its threads'
                    wait()

    def _discard(self, step: int) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self.data_directory / str(step), ignore_errors=True)
            for partial in self.directory.glob(f"{step}.*"):  # Orbax's temporary folder of the step
                shutil.rmtree(partial, ignore_errors=True)
        self.manager.reload()

    def _data_state_path(self, step: int) -> Path | None:
        return data_state_path(self.data_directory, step)

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        target = flatten(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings))
        flat = self.manager.restore(step, args=ocp.args.StandardRestore(target | self._stale_entries(step, target)))
        path = self._data_state_path(step)
        if path is None:
            raise FileNotFoundError(f"checkpoint step {step} has no data position at "
                                    f"{self.data_directory / str(step) / DATA_STATE_FILE}")
        return unflatten(flat, abstract), json.loads(path.read_text())

    def _stale_entries(self, step: int, target: dict) -> dict:
        """The arrays of checkpoint ``step`` that ``target`` no longer asks for (the frozen
        weights, which checkpoints of older versions held), replicated: Orbax restores a
        checkpoint's whole tree or nothing, so they are read and then dropped."""
        stored = self.manager.item_metadata(step) or {}
        some = next(iter(target.values()), None)
        sharding = getattr(some, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return {key: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)
                for key, meta in stored.items() if key not in target}

    def restore_latest(self, abstract: TrainState, shardings: TrainState) -> tuple[int, TrainState, dict] | None:
        """The newest checkpoint that restores, as ``(step, state, data position)``; None when
        there is none. Newer ones that fail are moved to ``checkpoints_unreadable/`` (one line
        says so); when none restores, nothing is moved and ``CheckpointError`` names the latest."""
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract, shardings)
            except Exception as error:  # noqa: BLE001 (a corrupt checkpoint fails in tensorstore, json, Orbax...)
                unreadable.append((step, error))
                continue
            if unreadable:
                self._set_aside([bad for bad, _ in unreadable])
                steps = ", ".join(str(bad) for bad, _ in unreadable)
                if jax.process_index() == 0:
                    print(f"checkpoint step {steps} cannot be restored ({one_line(unreadable[0][1])}); moved to "
                          f"{self.directory.parent / UNREADABLE_DIR}, resuming from step {step}", flush=True)
            self._prune(self.keep)
            return step, state, data_state
        if unreadable:
            step, error = unreadable[0]
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored, nor any older one: "
                                  f"{one_line(error)} (--job.start_over true discards them)")
        return None

    def wait(self) -> None:
        self._finish()
        self._prune(self.keep)

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / UNREADABLE_DIR
            aside.mkdir(exist_ok=True)
            for step in steps:
                shutil.rmtree(aside / str(step), ignore_errors=True)
                os.replace(self.directory / str(step), aside / str(step))
        self._sync("set_aside")
        self.manager.reload()

    def _prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints (at least one) and their data
        positions; delete the older checkpoints and positions. Newer positions stay: the one
        of the save about to start, or of a save cut short, which its step's next save replaces."""
        if jax.process_index() == 0:
            self.manager.reload()  # finalized steps, as on disk
            complete = [step for step in sorted(self.manager.all_steps()) if self._data_state_path(step)]
            kept = set(complete[-max(keep, 1):])
            if kept:
                for step in self.manager.all_steps():
                    if step not in kept and step < max(kept):
                        shutil.rmtree(self.directory / str(step), ignore_errors=True)
                for folder in self.data_directory.iterdir():
                    if folder.name.isdigit() and int(folder.name) not in kept and int(folder.name) < max(kept):
                        shutil.rmtree(folder, ignore_errors=True)
        self._sync("prune")
        self.manager.reload()

    def _sync(self, name: str) -> None:
        """Every process waits for process 0's file operations (barrier names must be unique)."""
        ocp.multihost.sync_global_processes(f"jaxflip_checkpointer_{name}_{next(self._barriers)}")

    def _write_data_state(self, step: int, data_state: dict) -> None:
        if jax.process_index() != 0:
            return
        folder = self.data_directory / str(step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DATA_STATE_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data_state))
        os.replace(partial, path)


def data_state_path(data_directory: Path, step: int) -> Path | None:
    """The data position of checkpoint ``step``, None when it was never written."""
    folder = data_directory / str(step)
    # process_0.json: the name single-process runs wrote before the position became one file
    return next((p for p in (folder / DATA_STATE_FILE, folder / "process_0.json") if p.is_file()), None)


def resume_step(output_dir: Path) -> int | None:
    """The step the next run of ``output_dir`` resumes from, read from disk: its newest complete
    checkpoint (a folder Orbax finalized, named by the step alone, with its data position);
    None when there is none. What a stopped run names, so that its claim is what is on disk."""
    checkpoints = Path(output_dir) / "checkpoints"
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    return max((step for step in steps if data_state_path(Path(output_dir) / "data_state", step)), default=None)


def remove_run_state(output_dir: Path) -> None:
    """Start over: drop the checkpoints, data positions and metrics of an earlier run."""
    output_dir = Path(output_dir)
    for name in RUN_STATE_DIRS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in RUN_STATE_FILES:
        (output_dir / name).unlink(missing_ok=True)
