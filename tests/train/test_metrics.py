"""metrics.jsonl on resume, the loss plot, the W&B backend."""

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxflip.train.__main__ import main
from jaxflip.train.metrics import MetricsLogger, StepProgress


def test_resume_drops_later_steps_and_a_line_cut_short_by_a_kill(tmp_path):
    rng = np.random.default_rng()
    records = [{"step": step, "loss": float(rng.uniform(1, 9))} for step in range(1, 8)]
    whole = "".join(json.dumps(record) + "\n" for record in records)
    (tmp_path / "metrics.jsonl").write_text(whole + json.dumps({"step": 8, "loss": 1.5})[:11])
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.truncate_after(5)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:5]
    logger.log({"step": 6, "loss": 2.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 6, "loss": 2.0}


def test_the_loss_plot_is_absolute_and_holds_both_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger("run", tensorboard=False)
    rng = np.random.default_rng()
    Path("run").mkdir()
    for step in range(1, 5):
        logger.log({"step": step, "loss": float(rng.uniform(1, 9))})
    logger.log({"step": 4, "val_loss": float(rng.uniform(1, 9))})
    assert logger.plot() == tmp_path / "run" / "loss.png" and (tmp_path / "run" / "loss.png").is_file()


class FakeWandb:
    """Stands in for the ``wandb`` module: records what the logger hands to W&B."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, scalars, step):
        self.logged.append((step, scalars))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_record_under_train_and_val_at_its_step(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rng = np.random.default_rng()
    first, loss, val_loss = (float(x) for x in rng.uniform(1, 9, size=3))
    settings = {"project": "jaxflip-test", "name": "run", "dir": str(tmp_path)}
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=settings)
    logger.log({"step": 1, "loss": first, "mfu": None})
    logger.log({"step": 2, "loss": loss})
    logger.log({"step": 2, "val_loss": val_loss})
    logger.close()
    assert fake.init_kwargs == settings
    assert fake.logged == [(1, {"train/loss": first}), (2, {"train/loss": loss}), (2, {"val/loss": val_loss})]
    assert fake.finished


@pytest.mark.slow  # wandb's writer process: on a loaded 2-core CI its file once held only its header after finish()
def test_the_real_wandb_offline_run_file_holds_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = np.random.default_rng()
    loss, val_loss = float(rng.uniform(1, 9)), float(rng.uniform(1, 9))
    logger = MetricsLogger(tmp_path, tensorboard=False,
                           wandb={"project": "jaxflip-test", "name": "run", "dir": str(tmp_path), "mode": "offline"})
    logger.log({"step": 1, "loss": float(rng.uniform(1, 9)), "mfu": None})
    logger.log({"step": 2, "loss": loss})
    logger.log({"step": 2, "val_loss": val_loss})
    logger.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    logged = run_file.read_bytes()  # protobuf records: each value as its JSON text after its key
    assert re.search(rb"train/loss.{1,4}" + re.escape(json.dumps(loss).encode()), logged, re.DOTALL)
    assert re.search(rb"val/loss.{1,4}" + re.escape(json.dumps(val_loss).encode()), logged, re.DOTALL)
    assert b"train/mfu" not in logged  # None is not logged


def test_wandb_asked_for_but_not_installed_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    code = main(["--job.output_dir", str(tmp_path / "run"), "--metrics.wandb", "true", "--training.steps", "1",
                 "--metrics.progress_bar", "false", "--bitflip.enable", "false"])
    error = capsys.readouterr().err
    assert code == 1
    assert error == ("error: metrics.wandb: the wandb package is not installed (pip install wandb, or set "
                     "metrics.wandb false)\n")


class Terminal(io.StringIO):
    """A file that says it is a terminal, as stderr is in a shell."""

    def isatty(self) -> bool:
        return True


def log_lines(progress: StepProgress, first: int, last: int) -> list[str]:
    """Steps ``first`` to ``last`` as the loop reports them, each with a log line."""
    lines = [f"step {step}  loss {np.random.default_rng().uniform(1, 9):.4f}" for step in range(first, last + 1)]
    for step, line in enumerate(lines, first):
        progress.step(step)
        progress.write(line)
    progress.close()
    return lines


def test_without_a_terminal_there_is_no_bar_only_the_log_lines(capsys):
    total = int(np.random.default_rng().integers(2, 30))
    lines = log_lines(StepProgress(total, enabled=True), 1, total)  # stderr: pytest's capture, not a terminal
    out, err = capsys.readouterr()
    assert out.splitlines() == lines and err == ""


def test_on_a_terminal_the_bar_starts_at_the_runs_first_step_and_lines_go_whole_to_stdout(capsys):
    """The bar starts once the run's first step (which compiles) is done, at that step (after a
    resume too), with no time elapsed; the log lines reach stdout whole, none on the bar's file."""
    rng = np.random.default_rng()
    total = int(rng.integers(5, 50))
    start = int(rng.integers(0, total - 1))  # the step a resumed run starts from
    terminal = Terminal()
    lines = log_lines(StepProgress(total, enabled=True, file=terminal), start + 1, total)
    assert capsys.readouterr().out.splitlines() == lines
    frames = [frame for frame in re.split(r"[\r\n]", terminal.getvalue()) if "train:" in frame]
    assert f" {start + 1}/{total} [00:00<" in frames[0] and f" {total}/{total} " in frames[-1]
    assert not any("loss" in frame for frame in frames)
