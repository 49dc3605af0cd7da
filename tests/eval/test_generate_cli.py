"""``generate``: sampling is a function of the seed, the stream is the text, greedy is top-1."""

import json

import pytest

from jaxflip.eval.__main__ import main

PROMPT = "Call me Ishmael. Some years ago"


def generate(path, tmp_path, *extra) -> dict:
    output = tmp_path / "generate.json"
    assert main(["generate", PROMPT, "--checkpoint", path, "--max-new-tokens", "12", "--output", str(output),
                 *extra]) == 0
    return json.loads(output.read_text())


def test_sampling_with_a_fixed_seed_is_deterministic(checkpoint, tmp_path):
    path, _ = checkpoint
    sampled = ["--do-sample", "--temperature", "2.0", "--top-p", "0.95"]
    first = generate(path, tmp_path, *sampled, "--seed", "3")["generated_tokens"]
    assert generate(path, tmp_path, *sampled, "--seed", "3")["generated_tokens"] == first
    assert generate(path, tmp_path, *sampled, "--seed", "4")["generated_tokens"] != first


def test_top_1_sampling_is_greedy(checkpoint, tmp_path):
    path, _ = checkpoint
    greedy = generate(path, tmp_path)["generated_tokens"]
    assert generate(path, tmp_path, "--do-sample", "--top-k", "1", "--seed", "5")["generated_tokens"] == greedy


def test_the_stream_prints_prompt_and_text(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    result = generate(path, tmp_path, "--do-sample", "--seed", "1")
    assert capsys.readouterr().out.startswith(PROMPT + result["text"] + "\n")


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be > 0, got -1.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
])
def test_bad_arguments_give_one_line_errors(checkpoint, capsys, extra, message):
    path, _ = checkpoint
    assert main(["generate", PROMPT, "--checkpoint", path, *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_a_missing_checkpoint_gives_a_one_line_error(tmp_path, capsys):
    assert main(["generate", PROMPT, "--checkpoint", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing" in error
