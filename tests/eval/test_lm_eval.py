"""lm-eval through the JAX-native ``JaxLM`` and through HFLM on the torch model with the
bridge's layers: the same numbers, clean and under bitflip."""

import json

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tiny_models import tiny_text_model

from jaxflip.data import load_tokenizer
from jaxflip.eval.__main__ import main
from jaxflip.eval.lm_eval_jax import JaxLM

# 916 tokens in the first held-out chapter: 15 rolling windows of 64, three batches of 5
TASK_ARGS = ["--tasks", "moby_dick", "--limit", "1", "--batch-size", "5", "--max-length", "64"]
METRICS = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")
RULES_YAML = """
model\\.layers\\.1\\.mlp\\..*:
  {x_p_exp: 0.0009765625, x_p_frac: 0.0009765625, x_zero_out_t: 50.0, w_p_exp: 0.0009765625,
   w_p_frac: 0.0009765625, w_zero_out_t: 1.0, x_seed_exp: 3, w_seed_frac: 8}
"""


def lm_eval(path, tmp_path, backend, *extra) -> dict:
    output = tmp_path / f"{backend}.json"
    assert main(["lm-eval", "--checkpoint", path, "--backend", backend, *TASK_ARGS, "--output", str(output),
                 *extra]) == 0
    return json.loads(output.read_text())["results"]["moby_dick"]


@pytest.mark.parametrize("bitflip", [False, True], ids=["clean", "bitflip"])
def test_local_task_gives_the_same_results_through_jax_and_torch(checkpoint, tmp_path, capsys, bitflip):
    path, _ = checkpoint
    extra = []
    if bitflip:
        (tmp_path / "rules.yaml").write_text(RULES_YAML)
        extra = ["--bitflip-config", str(tmp_path / "rules.yaml")]
    jax_results = lm_eval(path, tmp_path, "jax", *extra)
    progress = capsys.readouterr().err  # the JAX backend reports its windows as they are scored
    assert "Running loglikelihood requests" in progress and "15/15" in progress
    assert ("bitflip: 3 of 15 Linear layers flip" in progress) == bitflip
    torch_results = lm_eval(path, tmp_path, "torch", *extra)
    for metric in METRICS:
        assert jax_results[metric] == pytest.approx(torch_results[metric], rel=1e-5), metric
    assert "|moby_dick|" in capsys.readouterr().out  # lm-eval's own table
    if bitflip:
        clean = lm_eval(path, tmp_path, "jax")
        # without flips the two would be equal to the last bit; how far apart they are depends on the random model
        assert abs(clean["bits_per_byte,none"] - jax_results["bits_per_byte,none"]) > 1e-6, "the flips should show"


def greedy_pair(tokenizer, hf_model) -> tuple[str, str]:
    """A context and the text of the model's greedy next token, for a context after which
    that text tokenizes back into the same token."""
    for context in ("Call me Ishmael. Some years ago", "It was", "The sea", "Ahab said", "Queequeg and I"):
        with torch.no_grad():
            greedy = int(hf_model(torch.tensor([tokenizer.encode(context)])).logits[0, -1].argmax())
        if tokenizer.encode(context + tokenizer.decode([greedy])) == tokenizer.encode(context) + [greedy]:
            return context, tokenizer.decode([greedy])
    raise AssertionError("no context re-tokenizes with its greedy continuation")


def requests(tokenizer, hf_model) -> list[Instance]:
    """Contexts of several lengths, an empty one, a group sharing one context (lm-eval's
    one-token-continuation cache), and a continuation that is the model's greedy choice."""
    pairs = [greedy_pair(tokenizer, hf_model), ("", "The whale"), ("It was the", " best of times"),
             ("Whales", " swim"), ("Whales", " dive"), ("Whales", " sing"),
             ("A very long context about the sea and the ship and the captain,", " who")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_loglikelihood_and_greedy_generation_agree_with_hflm():
    hf_model, model = tiny_text_model(np.random.default_rng())
    tokenizer = load_tokenizer("builtin")
    ours = JaxLM(model, tokenizer, batch_size=3, max_length=32)
    reference = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=3, max_length=32)
    batch = requests(tokenizer, hf_model)

    got, expected = ours.loglikelihood(batch), reference.loglikelihood(batch)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert expected[0][1], "the first continuation is the greedy token"
    np.testing.assert_allclose([score for score, _ in got], [score for score, _ in expected], rtol=1e-5)

    generation = [Instance(request_type="generate_until", doc={}, idx=0, arguments=(
        "Call me Ishmael.", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}))]
    assert ours.generate_until(generation) == reference.generate_until(generation)


def test_unknown_task_gives_a_one_line_error(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["lm-eval", "--checkpoint", path, "--tasks", "no_such_task_here"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown lm-eval task(s) no_such_task_here" in error


def test_requests_of_many_lengths_compile_one_program_per_length_bucket():
    from jaxflip.compile_count import CompileCount

    hf_model, model = tiny_text_model(np.random.default_rng())
    tokenizer = load_tokenizer("builtin")
    ours = JaxLM(model, tokenizer, batch_size=2, max_length=32)
    batch = requests(tokenizer, hf_model)  # 7 requests of different lengths within the bucket of 16, the last batch short
    with CompileCount() as compiles:
        ours.loglikelihood(batch, disable_tqdm=True)
    assert compiles.of("_score") == 1, compiles


RECORDING_TASK_YAML = """
task: recorded_metadata
custom_dataset: !function recording_docs.load_dataset
output_type: loglikelihood_rolling
validation_split: validation
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
"""
RECORDING_DOCS = """
import json
from pathlib import Path

import datasets

from jaxflip.data import builtin_documents


def load_dataset(**metadata):
    Path(metadata["record_to"]).write_text(json.dumps(metadata))
    pages = builtin_documents("validation")[:1]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"page": pages})})
"""


def test_metadata_reaches_the_tasks_dataset_as_lm_evals_own_option_passes_it(checkpoint, tmp_path):
    """What lm-eval's advice to pass ``--metadata`` asks for: the task's dataset function gets it."""
    path, _ = checkpoint
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "recorded_metadata.yaml").write_text(RECORDING_TASK_YAML)
    (tasks / "recording_docs.py").write_text(RECORDING_DOCS)
    metadata = {"record_to": str(tmp_path / "metadata.json"),
                "max_seq_lengths": [int(np.random.default_rng().integers(1, 10**6))]}
    assert main(["lm-eval", "--checkpoint", path, "--tasks", "recorded_metadata", "--include-path", str(tasks),
                 "--limit", "1", "--max-length", "16", "--metadata", json.dumps(metadata)]) == 0
    assert json.loads((tmp_path / "metadata.json").read_text()).items() >= metadata.items()


@pytest.mark.parametrize("metadata, message", [("{max_seq_lengths: 1}", "--metadata is not JSON"),
                                               ("[4096]", "--metadata must be a JSON object of task arguments")])
def test_metadata_that_is_not_a_json_object_is_one_line_and_exit_2(checkpoint, capsys, metadata, message):
    path, _ = checkpoint
    assert main(["lm-eval", "--checkpoint", path, "--tasks", "moby_dick", "--metadata", metadata]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
