"""Whole runs: resume after an interruption, LoRA keeps its base, the quickstart learns."""

import dataclasses
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import LoRAParam, named_linears
from jaxflip.models import load
from jaxflip.train import setup
from jaxflip.train.checkpoint_manager import Checkpointer
from jaxflip.train.loop import run


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir):
    return [record["loss"] for record in records(output_dir) if "loss" in record]


# the same flips in every layer: the train state holds the layers stacked and the step scans them
EVERY_DOWN_PROJ = {r"model\.layers\.\d+\.mlp\.down_proj": dict(x_p_exp=0.5**10, x_p_frac=0.5**6, x_zero_out_t=30.0)}


# unrolled layers: slow (the scanned case, which the shipped configs use, runs in the default suite)
@pytest.mark.parametrize("layers", [pytest.param("unrolled", marks=pytest.mark.slow), "scanned"])
def test_sigterm_then_resume_gives_the_losses_of_an_unbroken_run(tiny_job, tmp_path, capsys, layers):
    bitflip = {"bitflip": {"rules": EVERY_DOWN_PROJ}} if layers == "scanned" else {}
    unbroken = tiny_job(job={"output_dir": str(tmp_path / "unbroken")}, **bitflip)
    run(unbroken)
    assert f"decoder layers: {layers}" in capsys.readouterr().out

    def terminate_at_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    broken = tiny_job(job={"output_dir": str(tmp_path / "broken")}, **bitflip)
    first = run(broken, on_step=terminate_at_step_3)
    # the signal comes after step 3 was logged: the run saves at the next step and stops there
    assert first["step"] == first["resumes_from"] == 4 and not first["finished"]
    second = run(broken)
    assert second["finished"]
    assert len(losses(tmp_path / "broken")) == 6
    assert losses(tmp_path / "broken") == losses(tmp_path / "unbroken")
    exported = load(second["model"])  # in the public layout either way
    assert isinstance(exported.model.layers, nnx.List) and len(exported.model.layers) == 2


def test_lora_resumes_with_the_losses_of_an_unbroken_run_from_checkpoints_without_the_base(tiny_job, tmp_path):
    lora = {"lora": {"r": 4, "lora_alpha": 8.0}, "training": {"steps": 4, "lr": 1e-2}}
    unbroken = tiny_job(job={"output_dir": str(tmp_path / "unbroken")}, **lora)
    run(unbroken)

    def terminate_at_step_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    broken = tiny_job(job={"output_dir": str(tmp_path / "broken")}, **lora)
    assert run(broken, on_step=terminate_at_step_2)["step"] == 3  # saved at the step after the signal
    checkpointer = Checkpointer(tmp_path / "broken", keep=1, async_save=False)
    stored = checkpointer.manager.item_metadata(3)
    checkpointer.close()
    assert any(key.startswith(".trainable") for key in stored)
    assert not any(key.startswith(".frozen") for key in stored)
    assert run(broken)["finished"]
    assert losses(tmp_path / "broken") == losses(tmp_path / "unbroken")


def test_lora_trains_the_adapters_and_leaves_the_base_bit_identical(tiny_job):
    config = tiny_job(lora={"r": 4, "lora_alpha": 8.0}, training={"steps": 3, "lr": 1e-2})
    summary = run(config)
    trained = load(summary["model"])
    fresh, _ = setup.build_model(config, setup.build_mesh(config))
    fresh_linears, trained_linears = named_linears(fresh), named_linears(trained)
    for name, linear in trained_linears.items():
        np.testing.assert_array_equal(np.asarray(linear.weight[...]), np.asarray(fresh_linears[name].weight[...]))
    b_factors = [np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(trained, LoRAParam))
                 if path[-1] == "lora_B"]
    assert b_factors and all(np.abs(b).max() > 0 for b in b_factors)


@dataclasses.dataclass(frozen=True)
class Quickstart:
    output_dir: Path
    stdout: str
    terminal: str  # what reached the terminal that was stderr: the progress bar


QUICKSTART_STEPS, QUICKSTART_LOG_FREQ = 40, 5


def terminal_output(read_fd: int, chunks: list[bytes]) -> None:
    """Read a pseudo-terminal until every writer has closed it (then Linux raises EIO)."""
    while True:
        try:
            chunk = os.read(read_fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        chunks.append(chunk)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Quickstart:
    """The README's main job as a user runs it (``python -m jaxflip.train``: one CPU device, no
    compilation cache), cut to 40 steps, its stdout piped and its stderr a terminal (80
    columns) as in a shell's ``> log`` (validation, which compiles a forward of its own, is
    tested in test_validation.py)."""
    out = tmp_path_factory.mktemp("quickstart") / "quickstart"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAXFLIP_COMPILATION_CACHE": ""}
    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxflip.train", "--job.output_dir", str(out),
         "--training.steps", str(QUICKSTART_STEPS), "--training.log_freq", str(QUICKSTART_LOG_FREQ)],
        env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    os.close(stderr)
    chunks = []
    reader = threading.Thread(target=terminal_output, args=(terminal, chunks))
    reader.start()
    stdout, _ = process.communicate(timeout=900)
    reader.join()
    os.close(terminal)
    text = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    return Quickstart(out, stdout, text)


def test_quickstart_config_runs_and_its_loss_falls(quickstart):
    out = quickstart.output_dir
    curve = losses(out)
    assert len(curve) == QUICKSTART_STEPS // QUICKSTART_LOG_FREQ + 1  # step 1, then every 5th
    assert abs(curve[0] - np.log(4096)) < 0.3  # a random init predicts the 4096 tokens about uniformly
    assert np.mean(curve[-2:]) < curve[0] - 0.5
    first, second = records(out)[:2]
    # the first step compiles: its time is reported apart and kept out of the throughput
    assert first["step"] == 1 and first["tokens_per_s"] is None and first["first_step_s"] > 0
    assert "XLA compilation included" in quickstart.stdout
    assert second["step"] == 5 and 4 * 512 / second["tokens_per_s"] < first["first_step_s"]
    assert (out / "loss.png").is_file() and (out / "model" / "jaxflip_model.json").is_file()
    assert json.loads((out / "config.json").read_text())["derived"]["devices"] == 1


NUMBER = re.compile(r"-?[0-9][0-9,]*(\.[0-9]+)?(e[-+]?[0-9]+)?")


def line_shape(line: str):
    """What a printed line says, without its numbers and paths: the JSON summary's keys in
    order, or the text with every path and number replaced."""
    if line.startswith("{"):
        return tuple(json.loads(line))
    return NUMBER.sub("#", re.sub(r"(?<!\S)/\S+", "PATH", line))  # a path starts a word: not tokens/s


def distinct_shapes(lines) -> list:
    """The shapes of ``lines`` with each run of one shape (the logged steps) counted once."""
    shapes = [line_shape(line) for line in lines]
    return [shape for i, shape in enumerate(shapes) if i == 0 or shape != shapes[i - 1]]


def readme_sample() -> list[str]:
    """The lines of the README's block under "What the main job prints", but its "..."."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### What the main job prints"):]
    block = section[section.index("```\n") + 4:]
    return [line for line in block[:block.index("```")].splitlines() if line != "..."]


def test_the_quickstart_prints_the_lines_of_the_readmes_sample(quickstart):
    """The same lines in the same order, each with the README's prefixes and fields (numbers
    and paths aside), and nothing else on stdout: no progress-bar text glued to a line."""
    assert distinct_shapes(quickstart.stdout.splitlines()) == distinct_shapes(readme_sample())


def test_the_bar_reaches_the_terminal_not_stdout_and_starts_after_the_compiling_step(quickstart):
    """stdout (piped) holds log lines only; the bar goes to the terminal, starting at step 1 with
    no time elapsed: the step that compiled is counted out of its rate and ETA."""
    assert not re.search(r"step/s|\d+/\d+ \[|it/s", quickstart.stdout)
    frames = [frame for frame in re.split(r"[\r\n]", quickstart.terminal) if "train:" in frame]
    assert frames and f" 1/{QUICKSTART_STEPS} [00:00<" in frames[0], frames[:2]
    assert not any(f" 0/{QUICKSTART_STEPS} " in frame for frame in frames)


def test_rerunning_a_finished_run_says_so_and_reports_its_last_logged_loss(tiny_job, capsys):
    config = tiny_job()
    first = run(config)
    capsys.readouterr()
    again = run(config)
    assert (f"already finished: the checkpoint is at step {first['step']} of training.steps {first['step']}"
            in capsys.readouterr().out)
    assert again["loss"] == first["loss"] == losses(Path(config.job.output_dir))[-1]


def test_lora_from_hf_weights_in_bfloat16(tiny_job, tmp_path):
    """The 70B recipe's shape at toy size: HF weights in, bf16 frozen base and compute, fp32 LoRA."""
    import ml_dtypes
    from hf_models import random_hf_model, tiny_hf_config

    hf_config = tiny_hf_config()
    hf_config.vocab_size = 4096  # the built-in tokenizer's
    hf_model = random_hf_model(hf_config, np.random.default_rng())
    hf_model.save_pretrained(tmp_path / "hf")
    config = tiny_job(model={"flavor": "8B", "hf_model_path": str(tmp_path / "hf"), "vocab_size": 0},
                      lora={"r": 4, "lora_alpha": 8.0}, bitflip={"rules": None, "x_p_frac": 0.5**8, "base_seed": 1},
                      training={"steps": 2, "dtype": "bfloat16", "mixed_precision_param": "bfloat16"})
    summary = run(config)
    assert summary["finished"] and np.isfinite(summary["loss"])
    trained = load(summary["model"])
    assert trained.model.layers[0].mlp.up_proj.weight[...].dtype == ml_dtypes.bfloat16
    assert trained.model.layers[0].mlp.up_proj.lora_A[...].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(trained.model.layers[1].self_attn.q_proj.weight[...]),
        hf_model.model.layers[1].self_attn.q_proj.weight.detach().to(torch_bfloat16()).float().numpy().astype(ml_dtypes.bfloat16))


def torch_bfloat16():
    import torch

    return torch.bfloat16


def test_a_non_finite_loss_stops_the_run_before_it_is_saved(tmp_path, monkeypatch, capsys):
    """The weights turn NaN in step 3 (a fault injected into the step); logged every 5 steps and
    saved every 2, the NaN is caught at step 4's save: exit 1, one line naming step 4, the
    checkpoint of step 2 is the last, nothing exported."""
    import jax
    import jax.numpy as jnp

    from jaxflip.train import loop
    from jaxflip.train.__main__ import main
    from jaxflip.train.checkpoint_manager import Checkpointer

    make_train_step = loop.make_train_step

    def poisoned_from_step_3(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = train_step(state, batch)
            if int(state.step) >= 3:
                state = state._replace(trainable=jax.tree.map(lambda w: w * jnp.nan, state.trainable))
                metrics = dict(metrics, loss=metrics["loss"] * jnp.nan)
            return state, metrics

        return step

    monkeypatch.setattr(loop, "make_train_step", poisoned_from_step_3)
    monkeypatch.setenv("JAXFLIP_COMPILATION_CACHE", "")
    output_dir = tmp_path / "run"
    code = main(["--config", "configs/quickstart.toml", "--job.output_dir", str(output_dir), "--bitflip.enable", "false",
                 "--training.seq_len", "32", "--training.local_batch_size", "1", "--steps", "6", "--log_freq", "5",
                 "--save_freq", "2", "--checkpoint.async_save", "false", "--metrics.tensorboard", "false",
                 "--metrics.progress_bar", "false"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: step 4: loss nan") and "(step 2)" in err and "\n" not in err
    assert Checkpointer(output_dir, keep=3, async_save=False).latest_step() == 2
    assert not (output_dir / "model").exists()


def test_a_resume_with_another_vocabulary_is_refused_before_the_model_is_built(tiny_job, monkeypatch):
    from pathlib import Path

    from jaxflip.train.train_config import ConfigError, to_dict

    first = tiny_job()
    output_dir = Path(first.job.output_dir)
    (output_dir / "checkpoints" / "2").mkdir(parents=True)
    (output_dir / "config.json").write_text(json.dumps(to_dict(first)))
    monkeypatch.setattr(setup, "build_model", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match="model.vocab_size 4096 -> 8192: differ"):
        run(tiny_job(model={"vocab_size": 8192}))


def saved_arrays(output_dir, step) -> dict:
    """Checkpoint ``step`` of a run as saved: ``{".trainable[...]": array, ".seeds[...]": ...}``."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(output_dir / "checkpoints", item_handlers=ocp.StandardCheckpointHandler())
    arrays = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return {key: np.asarray(value) for key, value in arrays.items()}


def part(arrays: dict, name: str) -> list:
    return [value for key, value in sorted(arrays.items()) if key.startswith(f".{name}")]


def test_non_finite_steps_are_skipped_without_an_update_up_to_the_limit_then_the_run_stops(tiny_job, monkeypatch,
                                                                                           capsys):
    """A token outside the vocabulary (its embedding lookup is NaN) in a micro-batch of steps 3
    and 5; training.skip_nonfinite 1: step 3 changes nothing but the seeds, step 4 trains,
    step 5 stops the run as a non-finite step does without the option."""
    from jaxflip.train import loop
    from jaxflip.train.loop import NonFiniteError

    config = tiny_job(training={"skip_nonfinite": 1, "save_freq": 1, "steps": 5}, checkpoint={"keep": 5},
                      bitflip={"rules": EVERY_DOWN_PROJ})  # layers scanned: compiles faster than unrolled
    accumulation = config.training.gradient_accumulation_steps
    vocab_size = config.model.vocab_size
    rng = np.random.default_rng()
    poisoned = {(step - 1) * accumulation + int(rng.integers(accumulation)) for step in (3, 5)}  # calls of next()

    class PoisonedStream(loop.BatchStream):
        calls = 0

        def __next__(self):
            rows = super().__next__()
            if PoisonedStream.calls in poisoned:
                rows = rows.copy()
                rows[0, int(rng.integers(rows.shape[1] - 1))] = vocab_size
            PoisonedStream.calls += 1
            return rows

    monkeypatch.setattr(loop, "BatchStream", PoisonedStream)
    with pytest.raises(NonFiniteError, match=r"^step 5: loss nan.* after 1 skipped .*\(step 4\)"):
        run(config)
    output_dir = Path(config.job.output_dir)
    assert "step 3: loss nan" in capsys.readouterr().out
    assert [r["step"] for r in records(output_dir) if "skipped" in r] == [3]
    assert [r["step"] for r in records(output_dir) if "loss" in r] == [1, 2, 4]
    before, skipped, after = (saved_arrays(output_dir, step) for step in (2, 3, 4))
    for name in ("trainable", "opt_state", "step"):
        for kept, unchanged in zip(part(before, name), part(skipped, name), strict=True):
            np.testing.assert_array_equal(unchanged, kept)
    # the seeds advance as in a trained step: the next step draws new flips
    advanced, advanced_next = ([n - o for n, o in zip(part(new, "seeds"), part(old, "seeds"), strict=True)]
                               for old, new in ((before, skipped), (skipped, after)))
    for by, by_next in zip(advanced, advanced_next, strict=True):
        np.testing.assert_array_equal(by, by_next)
    assert any(by.any() for by in advanced)
    assert not all(np.array_equal(new, old) for new, old in zip(part(after, "trainable"), part(skipped, "trainable")))
    assert int(part(after, "step")[0]) == 3  # optimizer steps: step 3 applied none


def train_in_a_process(config, cache_dir, *fault) -> subprocess.CompletedProcess:
    """The train CLI on ``config`` in a process of its own; ``fault``: ``(point, step, kill or
    a filler path)`` strikes during that save (``save_faults.py``). The processes share an XLA
    cache: only the first compiles."""
    import jaxflip
    from jaxflip.train.train_config import to_dict

    path = Path(config.job.output_dir).parent / f"{Path(config.job.output_dir).name}.yaml"
    path.write_text(json.dumps(to_dict(config)))  # JSON is YAML
    command = ([str(Path(__file__).parent / "save_faults.py"), *map(str, fault), "train"] if fault
               else ["-m", "jaxflip.train"])
    env = os.environ | {"PYTHONPATH": str(Path(jaxflip.__file__).parents[1]), "JAXFLIP_COMPILATION_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, *command, "--config", str(path)], capture_output=True, text=True,
                          timeout=900, env=env)


def exported_weights(output_dir) -> list:
    return [np.asarray(w) for w in jax.tree.leaves(nnx.state(load(output_dir / "model"), nnx.Param))]


@pytest.mark.slow  # eleven training runs in processes of their own: minutes on 2 CPU cores
def test_a_run_killed_at_any_point_of_a_save_resumes_to_the_losses_and_weights_of_an_unbroken_run(tiny_job, tmp_path):
    from save_faults import POINTS

    def job(name):
        return tiny_job(job={"output_dir": str(tmp_path / name)}, checkpoint={"async_save": True, "keep": 1},
                        training={"steps": 6, "save_freq": 2})

    assert train_in_a_process(job("unbroken"), tmp_path / "xla").returncode == 0
    for point in POINTS:
        killed = train_in_a_process(job(point), tmp_path / "xla", point, 4, "kill")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = train_in_a_process(job(point), tmp_path / "xla")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed from step {4 if point == 'finished' else 2}" in resumed.stdout
        assert losses(tmp_path / point) == losses(tmp_path / "unbroken"), point
        for weight, unbroken in zip(exported_weights(tmp_path / point), exported_weights(tmp_path / "unbroken"),
                                    strict=True):
            np.testing.assert_array_equal(weight, unbroken)


@pytest.mark.slow  # three training runs in processes of their own
def test_a_disk_that_fills_during_a_training_save_is_one_line_exit_1_and_the_run_resumes(tiny_job, tmpfs, tmp_path):
    """The disk fills once the data position of step 4 is written (Orbax's threads meet ENOSPC):
    one line naming the output folder, exit status 1, checkpoint 2 complete; with the disk
    freed, the same command resumes from it to the unbroken run's losses."""
    disk = tmpfs(2**26)

    def job(output_dir):
        return tiny_job(job={"output_dir": str(output_dir)}, checkpoint={"async_save": True, "keep": 1},
                        training={"steps": 4, "save_freq": 2})

    assert train_in_a_process(job(tmp_path / "unbroken"), tmp_path / "xla").returncode == 0
    failed = train_in_a_process(job(disk / "run"), tmp_path / "xla", "position", 4, disk / "filler")
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [failed.stderr.strip()]
    assert failed.stderr.startswith("error: [Errno 28] No space left on device: checkpoint step 4 could not be saved")
    assert str(disk / "run") in failed.stderr
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["2"]
    (disk / "filler").unlink()
    resumed = train_in_a_process(job(disk / "run"), tmp_path / "xla")
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stdout
    assert losses(disk / "run") == losses(tmp_path / "unbroken")
