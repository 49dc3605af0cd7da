"""The ``--output`` JSON: strict JSON (no NaN), whole or absent; its path checked before any model runs."""

import json

import numpy as np
import pytest

from jaxflip.eval import perplexity
from jaxflip.eval.__main__ import main
from jaxflip.eval.report import write_json


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    finite = float(np.random.default_rng().standard_normal())
    payload = {"rows": [{"loss": float("nan"), "perplexity": float("inf")}, {"loss": finite}],
               "ratio": np.float32("nan"), "bounds": (-float("inf"), finite)}
    write_json(tmp_path / "out" / "result.json", payload)
    written = strict_json((tmp_path / "out" / "result.json").read_text())
    assert written == {"rows": [{"loss": None, "perplexity": None}, {"loss": finite}], "ratio": None,
                       "bounds": [None, finite]}
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["result.json"]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Opening the model fails the test: the error must come first."""
    monkeypatch.setattr(perplexity, "open_model", lambda *args, **kwargs: pytest.fail("the model was opened"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("output, message", [
    (".", "is a folder; give a file name"),
    ("file.txt/result.json", "file.txt is a file, not a folder"),
])
def test_an_unwritable_output_path_is_bad_input_before_the_model_opens(output, message, tmp_path, capsys,
                                                                       monkeypatch, nothing_runs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("mine")
    assert main(["ppl", "--checkpoint", "ckpt", "--output", output]) == 2
    assert message in one_error_line(capsys)


def test_a_read_only_output_folder_is_exit_1_before_the_model_opens(tmpfs, capsys, nothing_runs):
    read_only = tmpfs(2**20, read_only=True)
    assert main(["ppl", "--checkpoint", "ckpt", "--output", str(read_only / "ppl.json")]) == 1
    assert "cannot write in" in one_error_line(capsys)


def test_bad_rule_settings_fail_before_the_model_opens(tmp_path, capsys, nothing_runs):
    (tmp_path / "rules.yaml").write_text(f"default: {{w_p_frac: {1 + np.random.default_rng().random():.3f}}}\n")
    assert main(["ppl", "--checkpoint", "ckpt", "--bitflip-config", str(tmp_path / "rules.yaml")]) == 2
    assert "w_p_frac must be a probability in (0, 1)" in one_error_line(capsys)
