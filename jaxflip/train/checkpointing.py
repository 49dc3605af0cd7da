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
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxflip.train.step import TrainState

DATA_STATE_FILE = "stream.json"


def flatten(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict, like):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(path)] for path, _ in paths])


class Checkpointer:
    def __init__(self, output_dir: Path, *, keep: int, async_save: bool):
        self.directory = Path(output_dir).absolute() / "checkpoints"
        self.data_directory = Path(output_dir).absolute() / "data_state"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        # the handler named: a fresh manager then reads a checkpoint's tree metadata (restore)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> None:
        self._write_data_state(step, data_state)
        self.manager.save(step, args=ocp.args.StandardSave(flatten(state)), force=force)
        self._prune_data_states()

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        target = flatten(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings))
        flat = self.manager.restore(step, args=ocp.args.StandardRestore(target | self._stale_entries(step, target)))
        folder = self.data_directory / str(step)
        # process_0.json: the name single-process runs wrote before the position became one file
        path = next((p for p in (folder / DATA_STATE_FILE, folder / "process_0.json") if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"checkpoint step {step} has no data position at {folder / DATA_STATE_FILE}")
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _write_data_state(self, step: int, data_state: dict) -> None:
        if jax.process_index() != 0:
            return
        folder = self.data_directory / str(step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / DATA_STATE_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data_state))
        os.replace(partial, path)

    def _prune_data_states(self) -> None:
        """Keep the data positions of the checkpoints Orbax keeps (and of the one being saved)."""
        if jax.process_index() != 0 or not self.data_directory.is_dir():
            return
        keep = set(self.manager.all_steps())
        newest = max((int(p.name) for p in self.data_directory.iterdir() if p.name.isdigit()), default=None)
        for folder in self.data_directory.iterdir():
            if folder.name.isdigit() and int(folder.name) not in keep and int(folder.name) != newest:
                shutil.rmtree(folder, ignore_errors=True)


def remove_run_state(output_dir: Path) -> None:
    """Start over: drop the checkpoints, data positions and metrics of an earlier run."""
    output_dir = Path(output_dir)
    for name in ("checkpoints", "data_state", "tensorboard", "model"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png"):
        (output_dir / name).unlink(missing_ok=True)
