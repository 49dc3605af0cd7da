"""Job configs: the reference's 70B file loads unchanged, errors name their field."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import named_linears
from jaxflip.models import LlamaForCausalLM, get_flavor
from jaxflip.train.__main__ import main
from jaxflip.train.train_config import ConfigError, from_dict, load_config

# NewComputeBench's config_70b.toml, verbatim from the 70B FSDP2 LoRA tutorial
REFERENCE_70B = """\
[model]
flavor = "70B"
hf_model_path = "meta-llama/Meta-Llama-3-70B"
[training]
dtype = "bfloat16"
mixed_precision_param = "bfloat16"
mixed_precision_reduce = "float32"
seq_len = 2048
local_batch_size = 2
gradient_accumulation_steps = 4
steps = 20 # override with --steps for full run
lr = 2e-4
weight_decay = 0.01
warmup_steps = 100
max_norm = 1.0
log_freq = 5
save_freq = 500
[parallelism]
fsdp_degree = 4
[lora]
r = 32
lora_alpha = 32
[bitflip]
w_p_exp = 1.52587890625e-05 # 0.5^16
w_p_frac = 1.52587890625e-05 # 0.5^16
w_zero_out_t = 256.0 # > profiled |w| max (126.5)
x_p_exp = 1.52587890625e-05 # 0.5^16
x_p_frac = 1.52587890625e-05 # 0.5^16
x_zero_out_t = 8192.0 # > profiled |x| max (3680)
base_seed = 0
skip_patterns = ["output"] # lm_head is not perturbed
"""


def test_reference_70b_config_loads_and_resolves(tmp_path, capsys):
    path = tmp_path / "config_70b.toml"
    path.write_text(REFERENCE_70B)
    assert main(["--config", str(path), "--steps", "21000", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["training"]["steps"] == 21000
    assert resolved["lora"] == {"r": 32, "lora_alpha": 32.0}
    assert resolved["derived"]["params"] == 70_553_706_496
    assert resolved["derived"]["tokens_per_step"] == 2 * 4 * 2048 * resolved["derived"]["devices"]


def test_shipped_70b_config_builds_the_70b_model_abstractly():
    config = load_config("configs/llama3-70b-lora.toml")
    model_config = get_flavor(config.flavor, param_dtype=config.training.dtype)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    assert sum(math.prod(v.shape) for _, v in nnx.to_flat_state(params)) == 70_553_706_496
    assert {v.dtype for _, v in nnx.to_flat_state(params)} == {jnp.dtype("bfloat16")}
    # the adapters LoRA would add: r x (in + out) for every Linear but the LM head
    linears = {name: linear for name, linear in named_linears(abstract).items() if name != "lm_head"}
    n_lora = sum(config.lora.r * (lin.in_features + lin.out_features) for lin in linears.values())
    d, kv, ffn, layers = 8192, 1024, 28672, 80
    per_layer = sum(32 * (i + o) for i, o in [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)])
    assert len(linears) == 560 and n_lora == layers * per_layer
    assert abstract.model.layers[79].mlp.down_proj.weight.shape == (d, ffn)


def test_token_budget_steps_are_derived(tmp_path, capsys):
    assert main(["--config", "configs/aixsim-60M.toml", "--print-config", "--parallelism.fsdp_degree", "-1"]) == 0
    derived = json.loads(capsys.readouterr().out)["derived"]
    assert derived["steps_for_token_budget"] == math.ceil(22 * derived["params"] / derived["tokens_per_step"])


def test_print_config_names_the_tokens_of_the_steps_apart_from_the_token_budget(capsys):
    """``tokens_in_training_steps`` follows ``--training.steps``; ``token_budget`` (token_scale x
    params, which ``steps_for_token_budget`` covers) does not."""
    steps = int(np.random.default_rng().integers(1, 10_000))
    assert main(["--config", "configs/aixsim-60M.toml", "--print-config", "--parallelism.fsdp_degree", "-1",
                 "--training.steps", str(steps)]) == 0
    derived = json.loads(capsys.readouterr().out)["derived"]
    assert derived["tokens_in_training_steps"] == steps * derived["tokens_per_step"]
    assert derived["token_budget"] == math.ceil(22 * derived["params"])


@pytest.mark.parametrize("override, message", [
    (["--training.stepz", "3"], "training.stepz: unknown field"),
    (["--bitflip.w_p_exp", "1.5"], "bitflip.w_p_exp must be a probability in (0, 1)"),
    (["--bitflip.seed_mode", "random"], "bitflip.seed_mode must be one of ('reference', 'independent')"),
    (["--training.lr", "fast"], "training.lr: expected a number"),
    (["--parallelism.fsdp_degree", "3"], "parallelism.fsdp_degree: 3 x data_parallel_replicate_degree 1 = 3 devices"),
    (["--parallelism.num_processes", "2"], "parallelism.coordinator_address: expected host:port of process 0"),
    (["--parallelism.coordinator_address", "127.0.0.1:1234", "--parallelism.num_processes", "2",
      "--parallelism.process_id", "2"], "parallelism.process_id: expected -1 or an integer in [0, 2), got 2"),
    (["--parallelism.process_id", "-2"], "parallelism.process_id: expected -1 or an integer >= 0, got -2"),
    (["--training.weight_decay", "inf"], "training.weight_decay: expected a finite number >= 0, got inf"),
    (["--training.max_norm", "nan"], "training.max_norm: expected a finite number >= 0, got nan"),
    (["--training.skip_nonfinite", "-1"], "training.skip_nonfinite: expected an integer >= 0 (0: stop at the first), "
                                          "got -1"),
    (["--lora.r", "4", "--lora.lora_alpha", "inf"], "lora.lora_alpha: expected a finite number > 0, got inf"),
    (["--bitflip.rules", "{default: {x_p_exp: 1.5}}"],
     "bitflip.rules: bitflip rule 'default': x_p_exp must be a probability in (0, 1) or None, got 1.5"),
    (["--bitflip.rules", "{default: {x_p_exp: 1.5}}", "--print-config"], "bitflip.rules: bitflip rule 'default'"),
    (["--bitflip.rules", "{'layers.(': {x_p_exp: 0.01}}"], "bitflip.rules: bitflip rule 'layers.(' is not a valid regex"),
    (["--data.dataset", "data/absent.jsonl"], "data.dataset: data/absent.jsonl: no such file or folder"),
    (["--training.seq_len", "4096"], "training.seq_len: 4096 is beyond the 2048 positions of the model "
                                     "(flavor aixsim-debug)"),
])
def test_bad_config_is_one_line_naming_the_field(override, message, tmp_path, capsys):
    code = main(["--config", "configs/quickstart.toml", "--job.output_dir", str(tmp_path / "run"), *override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {message}") and "\n" not in err


def test_the_old_module_is_a_deprecated_alias_of_the_config_and_the_bitflip_settings():
    import importlib
    import sys

    from jaxflip.bitflip import BitflipConfig
    from jaxflip.train import train_config

    sys.modules.pop("jaxflip.train.config", None)
    with pytest.warns(DeprecationWarning, match="jaxflip.train.config is deprecated"):
        old = importlib.import_module("jaxflip.train.config")
    assert old.BitflipConfig is BitflipConfig and old.TrainConfig is train_config.TrainConfig
    assert old.load_config is train_config.load_config


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="optimizer: unknown section"):
        from_dict({"optimizer": {"lr": 1}})


def test_a_resume_refuses_changes_to_the_model_data_or_flips_and_reports_the_others(tiny_job):
    from jaxflip.train.train_config import resume_changes, to_dict

    rng = np.random.default_rng()
    steps, vocab = int(rng.integers(7, 100)), int(rng.integers(4097, 9000))
    saved = json.loads(json.dumps(to_dict(tiny_job()) | {"derived": {}}))
    harmless = tiny_job(training={"steps": steps, "log_freq": 3, "save_freq": 4})
    assert resume_changes(saved, harmless) == [f"training.steps 6 -> {steps}", "training.log_freq 1 -> 3",
                                               "training.save_freq 2 -> 4"]
    changed = tiny_job(model={"vocab_size": vocab}, bitflip={"enable": False}, training={"steps": steps})
    with pytest.raises(ConfigError) as refused:
        resume_changes(saved, changed)
    message = str(refused.value)
    assert message.startswith(f"model.vocab_size 4096 -> {vocab}, bitflip.enable true -> false: differ")
    assert "--job.start_over true" in message and "--job.resume_anyway true" in message and "training" not in message
    anyway = tiny_job(model={"vocab_size": vocab}, job={"resume_anyway": True})
    assert resume_changes(saved, anyway) == [f"model.vocab_size 4096 -> {vocab}"]


@pytest.mark.parametrize("text, message", [
    ("- training\n- job\n", "expected a table of sections, got a list"),
    ("training: {lr: [1\n", "not valid YAML: while parsing a flow sequence"),
    ("training: !!python/object/apply:os.mkdir [marker]\n", "not valid YAML: could not determine a constructor"),
])
def test_bad_yaml_config_is_one_line_and_runs_nothing(text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(text)
    code = main(["--config", "job.yaml", "--job.output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: job.yaml: {message}") and "\n" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["job.yaml"]


def test_a_read_only_output_dir_is_one_line_and_exit_1(tmpfs, capsys):
    read_only = tmpfs(2**20, read_only=True)
    code = main(["--config", "configs/quickstart.toml", "--job.output_dir", str(read_only / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: [Errno 30] Read-only file system") and "\n" not in err
