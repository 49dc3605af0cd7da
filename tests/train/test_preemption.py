"""Preemption and concurrent runs: a signal at any moment says a checkpoint that exists (and the
next run resumes from it), a setup that fails leaves the old run, one run per output_dir."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxflip
from jaxflip.train.__main__ import main
from jaxflip.train.checkpoint_manager import resume_step
from jaxflip.train.loop import run
from jaxflip.train.run_lock import LOCK_FILE
from jaxflip.train.train_config import to_dict


def tree_bytes(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_signal_during_a_log_step_saves_the_step_the_run_claims(tiny_job, tmp_path):
    """The signal comes while the step is logged, after the step decided not to save (the loss
    fetched): the run used to stop there claiming a checkpoint it never wrote."""
    signal_step = int(np.random.default_rng().integers(2, 5))  # save_freq 5: never a save step
    config = tiny_job(training={"steps": 8, "save_freq": 5, "log_freq": 1}, bitflip={"enable": False})

    def terminate(step, record):
        if step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = run(config, on_step=terminate)
    assert not summary["finished"]
    assert summary["resumes_from"] == summary["step"] == resume_step(tmp_path / "run")


def train_process(config_path: Path, cache_dir: Path, config=None) -> subprocess.Popen:
    """``python -m jaxflip.train --config config_path`` (written from ``config`` first, if given),
    its stdout and stderr merged, line by line."""
    if config is not None:
        config_path.write_text(json.dumps(to_dict(config)))  # JSON is YAML
    # this checkout first, and whatever PYTHONPATH already holds (an install folder) after it
    path = os.pathsep.join(filter(None, [str(Path(jaxflip.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "JAXFLIP_COMPILATION_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxflip.train", "--config", str(config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def claimed_checkpoint(output: str) -> int | None:
    """The checkpoint step a stopped run says the next run resumes from (None: from step 0)."""
    if "no checkpoint is saved" in output:
        return None
    match = re.search(r"stopped at step (\d+) with a checkpoint|resumes from checkpoint step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1) or match.group(2))


MOMENTS = {
    "compiling": lambda line: "tokens per step" in line,  # the first step compiles next
    "after a log line": lambda line: re.match(r"step [23] ", line) is not None,
    "exporting": lambda line: line.startswith("exporting the model"),
}


# exporting only with the slow tests: the run has mostly decided to finish by then, and a signal
# while exporting stops as one while setting up does (test_a_run_stopped_while_setting_up_...)
@pytest.mark.parametrize("moment", [pytest.param(moment, marks=pytest.mark.slow) if moment == "exporting" else moment
                                    for moment in MOMENTS])
def test_sigterm_at_any_moment_names_a_checkpoint_that_exists_and_the_rerun_resumes_from_it(tiny_job, tmp_path,
                                                                                             moment):
    config = tiny_job(training={"steps": 6, "save_freq": 4, "log_freq": 1}, bitflip={"enable": False},
                      checkpoint={"async_save": True})
    config_path = tmp_path / "job.yaml"
    process = train_process(config_path, tmp_path / "xla", config)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if MOMENTS[moment](line):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert "Traceback" not in output, output[-3000:]
    summary = next((json.loads(line) for line in output.splitlines() if line.startswith("{")), None)
    if summary is not None and summary["finished"]:  # the signal came after the last decision to stop
        assert process.returncode == 0 and (tmp_path / "run" / "model").is_dir()
        return
    claimed = claimed_checkpoint(output)
    if claimed is not None:
        assert (tmp_path / "run" / "checkpoints" / str(claimed)).is_dir()
    rerun = train_process(config_path, tmp_path / "xla")
    rerun_output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, rerun_output[-3000:]
    assert (f"resumed from step {claimed}" in rerun_output) == (claimed is not None), rerun_output[-3000:]


def config_file(config, tmp_path) -> str:
    path = tmp_path / f"job-{np.random.default_rng().integers(1 << 30)}.yaml"
    path.write_text(json.dumps(to_dict(config)))  # JSON is YAML
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("failing", ["tokenizer", "dataset"])
def test_start_over_with_a_failing_setup_keeps_the_old_run(tiny_job, tmp_path, capsys, monkeypatch, failing):
    """The setup fails after the config is read (a tokenizer folder that is gone, a dataset
    file that is not text): the old run's checkpoints, model and metrics stay, byte for byte."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in CI
    config = tiny_job(training={"steps": 2, "save_freq": 2}, bitflip={"enable": False})
    assert run(config)["finished"]
    before = tree_bytes(tmp_path / "run")
    (tmp_path / "binary.txt").write_bytes(b"\xff" + np.random.default_rng().bytes(999))
    (tmp_path / "gone_tokenizer").mkdir()
    bad = {"tokenizer": ["--data.tokenizer", str(tmp_path / "gone_tokenizer")],
           "dataset": ["--data.dataset", str(tmp_path / "binary.txt")]}[failing]
    capsys.readouterr()
    assert main(["--config", config_file(config, tmp_path), "--job.start_over", "true", *bad]) != 0
    assert bad[1] in one_error_line(capsys)
    assert tree_bytes(tmp_path / "run") == before


@pytest.mark.parametrize("where", ["output_dir", "under output_dir's parent", "checkpoints", "model"])
def test_a_file_where_the_run_keeps_a_folder_is_refused_up_front(tiny_job, tmp_path, capsys, where):
    output_dir = tmp_path / "run"
    blocker = {"output_dir": output_dir, "under output_dir's parent": tmp_path / "parent",
               "checkpoints": output_dir / "checkpoints", "model": output_dir / "model"}[where]
    if where == "under output_dir's parent":
        output_dir = blocker / "run"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(np.random.default_rng().bytes(16))
    before = tree_bytes(tmp_path)
    config = tiny_job(job={"output_dir": str(output_dir)})
    start = time.perf_counter()
    assert main(["--config", config_file(config, tmp_path)]) == 2
    assert str(blocker) in one_error_line(capsys)
    assert time.perf_counter() - start < 30  # before the model is built
    assert {k: v for k, v in tree_bytes(tmp_path).items() if not k.startswith("job-")} == before


def test_a_second_run_of_the_same_output_dir_is_refused_in_one_line(tiny_job, tmp_path, capsys):
    from jaxflip.train.run_lock import RunLock

    config = tiny_job()
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        before = tree_bytes(tmp_path / "run")
        assert main(["--config", config_file(config, tmp_path)]) == 2
        assert f"process {os.getpid()}" in one_error_line(capsys)
        assert tree_bytes(tmp_path / "run") == before
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_line(tiny_job, tmp_path, capsys):
    config = tiny_job(training={"steps": 1}, bitflip={"enable": False})
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(f"process {killed.pid} on this host\n")
    assert run(config)["finished"]
    assert f"left by a run that is gone (process {killed.pid} on this host); taking it over" in capsys.readouterr().out
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_run_whose_setup_fails_leaves_no_output_dir_it_created(tiny_job, tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"\xff" + np.random.default_rng().bytes(999))  # not UTF-8
    config = tiny_job(data={"dataset": str(tmp_path / "binary.txt")})
    assert main(["--config", config_file(config, tmp_path)]) == 2
    assert "binary.txt: not a readable text dataset" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_second_signal_stops_at_once_in_one_line_naming_the_checkpoint_kept(tiny_job, tmp_path):
    """Ctrl-C twice: the second stops without saving (no traceback); the one line names the
    checkpoint that is on disk, and the rerun resumes from it."""
    config = tiny_job(training={"steps": 40, "save_freq": 2, "log_freq": 1}, bitflip={"enable": False})
    config_path = tmp_path / "job.yaml"
    process = train_process(config_path, tmp_path / "xla", config)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3 "):
            process.send_signal(signal.SIGINT)
        if line.startswith("received SIGINT"):
            process.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted; "), output[-3000:]
    claimed = claimed_checkpoint(errors[0])
    assert claimed is not None and (tmp_path / "run" / "checkpoints" / str(claimed)).is_dir()
    rerun = subprocess.run([sys.executable, "-m", "jaxflip.train", "--config", str(config_path),
                            "--training.steps", str(claimed + 1)], env=os.environ | {
        "PYTHONPATH": str(Path(jaxflip.__file__).parents[1]), "JAXFLIP_COMPILATION_CACHE": str(tmp_path / "xla")},
        capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {claimed}" in rerun.stdout


def test_a_run_stopped_while_setting_up_names_no_checkpoint_and_leaves_no_output_dir(tiny_job, tmp_path, monkeypatch):
    """A signal before the first step (here while the dataset opens): no step to save; the
    folder the run created is removed and the message says the next run starts afresh."""
    import jaxflip.train.loop as loop

    opened = loop.load_documents

    def signalled_while_opening(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return opened(*args, **kwargs)

    monkeypatch.setattr(loop, "load_documents", signalled_while_opening)
    with pytest.raises(loop.Interrupted, match="no checkpoint is saved: the next run starts from step 0"):
        run(tiny_job(bitflip={"enable": False}))
    assert not (tmp_path / "run").exists()
