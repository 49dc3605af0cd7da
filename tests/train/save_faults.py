"""A process that meets a fault at one point of a checkpoint save, for the fault-injection tests.

``python save_faults.py POINT STEP FAULT train ARGS...`` runs the train CLI with ARGS;
``python save_faults.py POINT STEP FAULT saves OUTPUT_DIR KEEP STEPS SEED`` saves
``saved_state(SEED, step)`` for steps 1..STEPS with a ``Checkpointer`` (async, KEEP kept).
At POINT of the save of STEP, FAULT strikes: ``kill`` is a real SIGKILL (nothing of Python's
cleanup runs, as when the machine or the scheduler kills a job); any other value is a path on
the output's disk that a file then fills (the disk is full from there on).

POINTS, in the order a save meets them:
  prune     the save has begun, the older checkpoints are about to be pruned
  position  the data position is written, Orbax's save not started
  writing   Orbax's threads are writing the arrays (``save`` returned)
  commit    the arrays are written, the step not finalized (its folder still temporary)
  finished  the step is finalized, the older checkpoints not pruned yet
"""

import os
import signal
import sys

import numpy as np

POINTS = ("prune", "position", "writing", "commit", "finished")


def saved_state(seed: int, step: int) -> dict:
    """The state the ``saves`` mode saves at ``step``: random, a function of ``seed`` and ``step``."""
    rng = np.random.default_rng([seed, step])
    # several arrays: Orbax writes them from several threads (what a full disk makes noisy)
    return {"w": rng.standard_normal((64, 48), np.float32), "b": {"x": rng.standard_normal(7, np.float32)},
            "layers": [rng.standard_normal(2**16, np.float32) for _ in range(8)]}


def position(step: int) -> dict:
    return {"position": step}


def install(point: str, fault_step: int, fault: str) -> None:
    from orbax.checkpoint._src.path import atomicity

    from jaxflip.train.checkpoint_manager import Checkpointer

    if point not in POINTS:
        raise SystemExit(f"unknown point {point}; one of {POINTS}")

    def strike(step):
        if step != fault_step:
            return
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        with open(fault, "wb") as filler:
            try:
                while True:
                    filler.write(os.urandom(2**16))
                    filler.flush()
            except OSError:  # full
                pass

    save, prune, write_position, finish = (Checkpointer.save, Checkpointer._prune, Checkpointer._write_data_state,
                                           Checkpointer._finish)
    commit = atomicity.on_commit_callback
    saving = [None]

    def patched_save(self, step, *args, **kwargs):
        saving[0] = step
        save(self, step, *args, **kwargs)
        if point == "writing":
            strike(step)

    def patched_prune(self, keep):
        if point == "prune":
            strike(saving[0])
        prune(self, keep)

    def patched_write_position(self, step, data_state):
        write_position(self, step, data_state)
        if point == "position":
            strike(step)

    async def patched_commit(tmp_dir, **kwargs):
        if point == "commit":
            strike(int(tmp_dir.get_final().name))
        await commit(tmp_dir, **kwargs)

    def patched_finish(self):
        step = self._in_flight
        finish(self)
        if point == "finished":
            strike(step)

    Checkpointer.save, Checkpointer._prune = patched_save, patched_prune
    Checkpointer._write_data_state, Checkpointer._finish = patched_write_position, patched_finish
    atomicity.on_commit_callback = patched_commit


def saves(output_dir: str, keep: int, steps: int, seed: int) -> int:
    """Save the states of steps 1..steps; an OS fault is one ``error:`` line and status 1, as in the CLIs."""
    import jax
    import jax.numpy as jnp

    from jaxflip.train.checkpoint_manager import Checkpointer

    checkpointer = Checkpointer(output_dir, keep=keep, async_save=True)
    try:
        for step in range(1, steps + 1):
            checkpointer.save(step, jax.tree.map(jnp.asarray, saved_state(seed, step)), position(step))
        checkpointer.close()
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    point, fault_step, fault, mode, *rest = sys.argv[1:]
    install(point, int(fault_step), fault)
    if mode == "train":
        from jaxflip.train.__main__ import main

        sys.exit(main(rest))
    output_dir, keep, steps, seed = rest
    sys.exit(saves(output_dir, int(keep), int(steps), int(seed)))
