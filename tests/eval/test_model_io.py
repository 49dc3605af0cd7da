"""Every eval command takes a training run folder as ``--checkpoint``: it evaluates the run's
``model/`` and says so in one line; a run folder with no model yet is a one-line error."""

import json
import shutil

import numpy as np
import pytest
from tiny_models import as_training_run, save_checkpoint, tiny_text_model

from jaxflip.eval.__main__ import COMMANDS, main

WINDOWS = ["--seq-len", "16", "--num-sequences", "2"]
BASE_TOML = """
[bitflip]
x_p_exp = 0.0009765625
x_zero_out_t = 50.0
skip_patterns = ["layers.0.", "self_attn"]
"""


def command_arguments(command: str, tmp_path) -> list[str]:
    """What each command needs besides ``--checkpoint`` and ``--output``: its smallest run."""
    base = tmp_path / "base.toml"
    base.write_text(BASE_TOML)
    return {"ppl": WINDOWS,
            "sweep": [*WINDOWS, "--bitflip-config", str(base), "--grid", "x_p_exp=0.5^4", "--seeds", "1",
                      "--output-dir", str(tmp_path / "sweep")],
            "profile": [*WINDOWS, "--histogram", str(tmp_path / "histogram.png")],
            "generate": ["Call me Ishmael.", "--max-new-tokens", "2"],
            "lm-eval": ["--tasks", "moby_dick", "--limit", "1", "--max-length", "16"]}[command]


@pytest.fixture
def run_folder(tmp_path):
    """A training run folder of a fresh random tiny model: ``model/``, ``config.json``, ``metrics.jsonl``."""
    _, model = tiny_text_model(np.random.default_rng())
    save_checkpoint(model, tmp_path / "run" / "model")
    return as_training_run(tmp_path / "run")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_evaluates_a_training_run_folder_through_its_model(command, run_folder, tmp_path, capsys):
    output = tmp_path / "out.json"
    assert main([command, "--checkpoint", str(run_folder), "--output", str(output),
                 *command_arguments(command, tmp_path)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "training run folder" in line]
    assert notes == [f"note: {run_folder} is a training run folder; evaluating its model {run_folder / 'model'}"]
    assert json.loads(output.read_text())["checkpoint"] == str(run_folder / "model")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_folder_without_its_model_yet_is_one_line_and_exit_2(command, run_folder, tmp_path, capsys):
    shutil.rmtree(run_folder / "model")
    assert main([command, "--checkpoint", str(run_folder), *command_arguments(command, tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{run_folder} is a training run folder without a model yet" in error
