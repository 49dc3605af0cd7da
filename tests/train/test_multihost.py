"""Multi-host training for real: two processes on this machine (``jax.distributed`` with a local
coordinator, 2 CPU devices each) against one process with the same 4 devices and the same
global batch, on the quickstart config cut to a few short steps. Each run is a ``python -m
jaxflip.train`` child, as a user (or SLURM) launches one per host."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test trains two or more runs: a minute or more on 2 CPU cores

REPO = Path(__file__).parents[2]
DEVICES = 4
STEPS = 6
RESUME_STEP = 3  # checkpoints are saved every RESUME_STEP steps
CHILD_TIMEOUT_S = 600
# the quickstart's flips on one Linear only, at rates that flip something in a few short steps:
# compiling the Philox code of all its 28 flipped tensors takes minutes on 2 CPU cores
ONE_FLIPPED_LAYER = json.dumps({r"model\.layers\.0\.mlp\.down_proj": dict(
    x_p_exp=0.5**10, x_p_frac=0.5**6, x_zero_out_t=30.0, w_p_exp=0.5**10, w_p_frac=0.5**6, w_zero_out_t=1.25)})
SMALL_QUICKSTART = ["--training.steps", str(STEPS), "--training.seq_len", "32", "--training.local_batch_size", "1",
                    "--training.warmup_steps", "2", "--training.log_freq", "1",
                    "--training.save_freq", str(RESUME_STEP), "--bitflip.rules", ONE_FLIPPED_LAYER,
                    "--data.prefetch", "2", "--checkpoint.export_model", "false", "--metrics.progress_bar", "false",
                    "--metrics.tensorboard", "false", "--metrics.plot", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(output_dir: Path, processes: int, *overrides: str, cache_dir: Path, exit_code: int = 0) -> list[str]:
    """Train the small quickstart in ``output_dir`` on ``processes`` processes that share
    ``DEVICES`` CPU devices; returns their logs. Fails the test with the logs if a process
    exits with another code than ``exit_code`` or they hang."""
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jaxflip.train", "--config", str(REPO / "configs" / "quickstart.toml"),
               "--job.output_dir", str(output_dir), *SMALL_QUICKSTART, *overrides]
    if processes > 1:
        command += ["--parallelism.coordinator_address", f"127.0.0.1:{free_port()}",
                    "--parallelism.num_processes", str(processes)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_"))} | {
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}",
        "PYTHONPATH": str(REPO), "JAXFLIP_COMPILATION_CACHE": str(cache_dir)}
    logs = [output_dir / f"process_{i}.log" for i in range(processes)]
    children = []
    for i, log in enumerate(logs):
        with log.open("w") as out:
            process_flags = ["--parallelism.process_id", str(i)] if processes > 1 else []
            children.append(subprocess.Popen(command + process_flags, env=env, cwd=REPO, stdout=out,
                                             stderr=subprocess.STDOUT))

    def first_failure() -> str | None:
        return next((f"process {i} exited with {child.returncode}" for i, child in enumerate(children)
                     if child.poll() not in (None, exit_code)), None)

    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        # watch all of them: a process that failed leaves the others waiting on it
        while (failure := first_failure()) is None and any(child.poll() is None for child in children):
            if time.monotonic() > deadline:
                failure = f"the processes did not finish in {CHILD_TIMEOUT_S} s (coordinator hung?)"
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if failure:
        pytest.fail(f"{failure}; command: {' '.join(command)}\n" + "\n".join(
            f"----- {log.name} -----\n{log.read_text()[-6000:]}" for log in logs), pytrace=False)
    return [log.read_text() for log in logs]


def logged_losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def resume_elsewhere(checkpointed_run: Path, output_dir: Path, step: int = RESUME_STEP) -> Path:
    """A fresh output folder holding only ``checkpointed_run``'s checkpoint of ``step``."""
    for name in ("checkpoints", "data_state"):
        shutil.copytree(checkpointed_run / name / str(step), output_dir / name / str(step))
    return output_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One XLA compilation cache for the module: the runs compile the same programs."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def unbroken_runs(tmp_path_factory, cache_dir):
    """Output folders of the whole run, on one process and on two."""
    root = tmp_path_factory.mktemp("multihost")
    runs = {processes: root / f"{processes}_processes" for processes in (1, 2)}
    for processes, output_dir in runs.items():
        train(output_dir, processes, cache_dir=cache_dir)
    return runs


def test_two_processes_train_as_one_process_with_the_same_devices(unbroken_runs):
    one, two = (logged_losses(unbroken_runs[processes]) for processes in (1, 2))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert one[STEPS] < one[1]  # it trains: the steps are not all the same
    assert [json.loads((unbroken_runs[p] / "config.json").read_text())["derived"]["devices"] for p in (1, 2)] == [
        DEVICES, DEVICES]
    position = [json.loads((unbroken_runs[p] / "data_state" / str(RESUME_STEP) / "stream.json").read_text())
                for p in (1, 2)]
    assert position[0] == position[1]


@pytest.mark.parametrize("written_by, resumed_by", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(unbroken_runs, written_by, resumed_by, tmp_path, cache_dir):
    resumed = resume_elsewhere(unbroken_runs[written_by], tmp_path / "resumed")
    train(resumed, resumed_by, cache_dir=cache_dir)
    losses = logged_losses(resumed)
    assert sorted(losses) == list(range(RESUME_STEP + 1, STEPS + 1))  # it resumed, and did not start over
    expected = logged_losses(unbroken_runs[1])
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(losses)],
                               rtol=1e-5)
    assert (resumed / "checkpoints" / str(STEPS)).is_dir()


def test_two_processes_train_as_one_without_bitflips(unbroken_runs, tmp_path, cache_dir):
    runs = {processes: tmp_path / f"{processes}_processes" for processes in (1, 2)}
    for processes, output_dir in runs.items():
        train(output_dir, processes, "--bitflip.enable", "false", "--training.steps", "2", cache_dir=cache_dir)
    one, two = (logged_losses(runs[processes]) for processes in (1, 2))
    assert sorted(one) == sorted(two) == [1, 2]
    np.testing.assert_allclose([two[s] for s in (1, 2)], [one[s] for s in (1, 2)], rtol=1e-5)
    # the same weights and batch with flips give another loss: the runs above do flip
    assert abs(one[1] - logged_losses(unbroken_runs[1])[1]) > 1e-4


def test_two_processes_refuse_to_export_and_one_process_exports_their_checkpoint(unbroken_runs, tmp_path, cache_dir):
    logs = train(tmp_path / "refused", 2, "--checkpoint.export_model", "true", cache_dir=cache_dir, exit_code=2)
    assert all("error: checkpoint.export_model: not supported with 2 processes" in log for log in logs)
    exported = resume_elsewhere(unbroken_runs[2], tmp_path / "exported", step=STEPS)
    train(exported, 1, "--checkpoint.export_model", "true", cache_dir=cache_dir)
    assert (exported / "model" / "jaxflip_model.json").is_file()
