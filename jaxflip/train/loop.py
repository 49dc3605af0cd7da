"""The training run: set up, resume if a checkpoint is there, step, log, checkpoint, export.

Everything a run writes goes under ``[job] output_dir``: ``config.json`` (resolved),
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` + ``data_state/``, ``loss.png`` and, at
the end, ``model/`` (a ``jaxflip.models`` checkpoint that eval and the converters read).
Running the same command again resumes from the latest checkpoint; ``--job.start_over true``
discards it once the new run's setup has passed. Runs of one ``output_dir`` exclude each other
(``RunLock``). SIGTERM (or Ctrl-C) while stepping saves a checkpoint at the step reached and
exits cleanly; at any other moment (setting up, exporting), or at a second signal, the run stops
at once with ``Interrupted``, which names the checkpoint the next run resumes from. A
non-finite loss or gradient stops the run before it is saved (``NonFiniteError``), or, up to
``training.skip_nonfinite`` times (skips before a resume count), skips the step (no update;
``make_train_step``).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxflip.data.pipeline import BatchStream, StreamSpec
from jaxflip.data.sources import BUILTIN_TOKENIZER, builtin_tokenizer_dir, load_documents
from jaxflip.models import get_flavor, save
from jaxflip.models.flavors import param_count
from jaxflip.models.scan import unstack_layers
from jaxflip.train import setup
from jaxflip.train.checkpoint_manager import RUN_STATE_DIRS, Checkpointer, remove_run_state, resume_step
from jaxflip.train.run_lock import RunLock
from jaxflip.train.train_config import ConfigError, TrainConfig, resume_changes, to_dict
from jaxflip.train.metrics import MetricsLogger, StepProgress, device_memory_gib, format_record
from jaxflip.train.step import (batch_sharding, flops_per_token, init_state, learning_rate_schedule,
                                make_optimizer, make_train_step, merge_model, peak_flops, trainable_param_count)
from jaxflip.train.validation import Validator, due, format_validation


def derived_numbers(config: TrainConfig, device_count: int | None = None) -> dict:
    """What the config implies: parameters, tokens per step, steps for the token budget."""
    t = config.training
    devices = device_count or jax.device_count()
    changes = {"vocab_size": config.model.vocab_size} if config.model.vocab_size else {}
    params = param_count(get_flavor(config.flavor, **changes))
    global_batch = t.local_batch_size * devices
    tokens_per_step = global_batch * t.gradient_accumulation_steps * t.seq_len
    # named apart: the tokens that training.steps train on, and the budget of token_scale x params
    derived = {"params": params, "devices": devices, "global_batch": global_batch,
               "tokens_per_step": tokens_per_step, "tokens_in_training_steps": tokens_per_step * t.steps}
    if t.token_scale > 0:
        derived["token_budget"] = math.ceil(t.token_scale * params)
        derived["steps_for_token_budget"] = math.ceil(derived["token_budget"] / tokens_per_step)
    return derived


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: training stops before saving it."""


def non_finite(metrics: dict) -> str:
    """``loss nan, grad_norm inf``: the loss and gradient norm that are NaN or infinite; "" if none."""
    return ", ".join(f"{name} {float(metrics[name])}" for name in ("loss", "grad_norm")
                     if not math.isfinite(float(metrics[name])))


def check_finite(step: int, metrics: dict, checkpointer: Checkpointer | None, skipped: int = 0) -> None:
    """Raise ``NonFiniteError`` (one line naming the step and the checkpoint kept) when
    ``metrics`` hold a non-finite loss or gradient norm. Checked wherever the loss is fetched
    anyway and before every save, so that no checkpoint or export holds such a state (a NaN,
    once in the weights, stays there). ``skipped``: the non-finite steps skipped before."""
    values = non_finite(metrics)
    if not values:
        return
    kept = checkpointer.latest_step() if checkpointer is not None else None
    where = f"the last checkpoint (step {kept}) is finite and stays" if kept is not None else "no checkpoint is kept"
    after = f" after {skipped} skipped (training.skip_nonfinite)" if skipped else ""
    raise NonFiniteError(f"step {step}: {values}{after}; training stopped before saving it ({where}); lower "
                         f"training.lr, set the bitflip zero-out thresholds, or clip with training.max_norm")


def check_resume_config(config: TrainConfig, output_dir: Path) -> list[str]:
    """Before a resume: the changes from the config of the run that wrote ``output_dir``'s
    checkpoints (``config.json``) that a resume allows; a ``ConfigError`` for the others."""
    saved = output_dir / "config.json"
    checkpoints = output_dir / "checkpoints"
    if not (config.checkpoint.enable and saved.is_file() and checkpoints.is_dir()
            and any(p.name.isdigit() for p in checkpoints.iterdir())):
        return []
    try:
        saved_config = json.loads(saved.read_text())
    except ValueError:  # cut short by a kill: nothing to compare with
        print(f"{saved} is not readable JSON; the config is not compared with the checkpoint's", flush=True)
        return []
    return resume_changes(saved_config, config)


def check_output_dir(output_dir: Path) -> None:
    """``ConfigError`` when ``output_dir``, a folder above it, or a folder the run keeps in it
    is a file: found before anything is written (a file in Orbax's way fails only the first
    save, and can leave its threads blocking the exit)."""
    output_dir = output_dir.absolute()
    for folder in reversed([output_dir, *output_dir.parents]):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"job.output_dir: {folder} is a file, not a folder")
    for name in RUN_STATE_DIRS:
        if (output_dir / name).exists() and not (output_dir / name).is_dir():
            raise ConfigError(f"job.output_dir: {output_dir / name} is a file where the run keeps its {name} "
                              f"folder; move it away")


def resume_note(output_dir: Path) -> str:
    """Where the next run of ``output_dir`` starts, as on disk now."""
    step = resume_step(output_dir)
    if step is None:
        return "no checkpoint is saved: the next run starts from step 0"
    folder = Path(output_dir).absolute() / "checkpoints" / str(step)
    return f"the next run resumes from checkpoint step {step} ({folder})"


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run where it could not save (setting up, exporting, or a second
    signal); the message says which checkpoint the next run resumes from."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and exits at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: stopping after this step", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(config: TrainConfig, *, on_step=None) -> dict:
    """Train as configured; returns a summary (``resumes_from``: the step of the checkpoint the
    next run resumes from, None without one). ``on_step(step, metrics)``: called after each
    logged step (tests use it to interrupt a run). Holds ``output_dir``'s lock; a run that fails
    or is stopped before it saved anything removes the ``output_dir`` it created."""
    setup.initialize_distributed(config)
    output_dir = Path(config.job.output_dir)
    check_output_dir(output_dir)
    main_process = jax.process_index() == 0
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM outside the loop: as Ctrl-C
    try:
        if not main_process:
            return _run(config, output_dir, on_step)
        with RunLock(output_dir):
            return _run(config, output_dir, on_step)
    except BaseException as error:
        if created and main_process and resume_step(output_dir) is None and not any(
                (output_dir / name).exists() for name in ("model", "metrics.jsonl")):
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing of the run in it: no step logged or saved
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {resume_note(output_dir)}") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _run(config: TrainConfig, output_dir: Path, on_step) -> dict:
    t = config.training
    lora = config.lora.r > 0
    main_process = jax.process_index() == 0
    if main_process:
        print(f"output_dir: {output_dir.absolute()}", flush=True)
    changes = [] if config.job.start_over else check_resume_config(config, output_dir)

    mesh = setup.build_mesh(config)
    model, model_tokenizer_dir = setup.build_model(config, mesh)
    rule_table = setup.apply_bitflip(config, model)
    if main_process and rule_table is not None:
        flipped = sum(row.flipped for row in rule_table)
        print(f"bitflip: {flipped} of {len(rule_table)} Linear layers flip", flush=True)
    tokenizer = setup.load_config_tokenizer(config, model_tokenizer_dir, model)
    model_config = model.config
    # the dataset opens (a bad file fails here, before anything in output_dir changes)
    load_documents(config.data.dataset, split=config.data.split, subset=config.data.subset or None,
                   text_field=config.data.text_field)

    tx = make_optimizer(t)
    graphdef, state, shardings, scanned = init_state(model, tx, mesh, lora)
    del model
    if main_process:
        print("decoder layers: " + ("scanned" if scanned else
                                    "unrolled (a Python loop: the layers differ in their flip settings)"), flush=True)
    if config.job.start_over:  # the new run's setup passed: the old run can go
        if main_process:
            remove_run_state(output_dir)
        if jax.process_count() > 1:  # no process restores what process 0 is removing
            multihost_utils.sync_global_devices("jaxflip_start_over")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    checkpointer = (Checkpointer(output_dir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
                    if config.checkpoint.enable else None)
    data_state = None
    start = 0
    # checkpoints leave out the frozen weights (LoRA's base): never trained, they are rebuilt
    # from their source above (hf_model_path, checkpoint or the random init's seed)
    restored = (checkpointer.restore_latest(abstract._replace(frozen=None), shardings._replace(frozen=None))
                if checkpointer else None)
    if restored is not None:
        latest, restored_state, data_state = restored
        state = restored_state._replace(frozen=state.frozen)
        start = latest
        if main_process:
            print(f"resumed from step {latest} ({checkpointer.directory})", flush=True)
            if changes:
                print(f"changed since the checkpoint: {'; '.join(changes)}", flush=True)
    # steps skipped for a non-finite loss (training.skip_nonfinite): run but not counted in state.step
    skipped = start - int(state.step)
    if main_process:
        resolved = to_dict(config) | {"derived": derived_numbers(config)}
        (output_dir / "config.json").write_text(json.dumps(resolved, indent=1, default=str))

    devices = jax.device_count()
    spec = StreamSpec(config.data.dataset, tokenizer, t.seq_len, t.local_batch_size * devices, seed=config.job.seed,
                      split=config.data.split, subset=config.data.subset or None, text_field=config.data.text_field)
    stream = BatchStream(spec, state=data_state, prefetch=config.data.prefetch)
    batch_shard = batch_sharding(mesh)
    global_shape = (t.gradient_accumulation_steps, t.local_batch_size * devices, t.seq_len + 1)
    train_step = make_train_step(graphdef, tx, t, shardings, batch_shard)
    schedule = learning_rate_schedule(t)
    tokens_per_step = math.prod(global_shape[:2]) * t.seq_len
    flops = flops_per_token(model_config, t.seq_len, lora)
    peak = peak_flops(jax.devices()[0])

    validator = (Validator(config, tokenizer, graphdef, shardings, batch_shard)
                 if config.validation.eval_interval else None)
    logger = MetricsLogger(output_dir, tensorboard=config.metrics.tensorboard, wandb=wandb_settings(config))
    logger.truncate_after(start)
    if main_process:
        print(f"{trainable_param_count(state):,} trained parameters; {tokens_per_step:,} tokens per step; "
              f"mesh {dict(mesh.shape)}", flush=True)
    progress = StepProgress(t.steps, enabled=main_process and config.metrics.progress_bar)

    def show(line: str) -> None:
        """A log line on the main process, above the progress bar when there is one."""
        if main_process:
            progress.write(line)

    step, last_log_step, last_log_time = start, start, time.perf_counter()
    record = summary_validation = None
    try:
        with _StopRequest() as stop:
            while step < t.steps:
                # every process reads the global batch and places the rows of its own devices
                rows = np.stack([next(stream) for _ in range(t.gradient_accumulation_steps)])
                batch = jax.make_array_from_callback(global_shape, batch_shard, lambda index: rows[index])
                state, metrics = train_step(state, batch)
                step += 1
                progress.step(step)
                # read once: a signal from here on (logging, validating, saving) is this step's
                # if it came before, else the next one's, which then saves and stops
                stopping = stop.requested
                saving = checkpointer is not None and (step % t.save_freq == 0 or step == t.steps or stopping)
                first = step == start + 1  # compiles the step: logged on its own, kept out of tokens/s
                log_step = first or step % t.log_freq == 0 or step == t.steps or stopping
                # the loss is fetched (a host sync) where it is logged or saved, and at every step
                # that may have to be counted as skipped
                if log_step or saving or t.skip_nonfinite:
                    metrics = jax.device_get(metrics)
                    values = non_finite(metrics)
                    if values and skipped < t.skip_nonfinite:
                        skipped += 1  # the step applied no update (make_train_step)
                        logger.log({"step": step, "skipped": values, "skipped_steps": skipped})
                        show(f"step {step}: {values}; skipped, no update ({skipped} of at most "
                             f"{t.skip_nonfinite}, training.skip_nonfinite)")
                        log_step = False
                    else:
                        check_finite(step, metrics, checkpointer, skipped)
                if log_step:
                    now = time.perf_counter()
                    tokens_per_s = None if first else (step - last_log_step) * tokens_per_step / (now - last_log_time)
                    record = {"step": step, "loss": float(metrics["loss"]), "lr": float(schedule(step - skipped - 1)),
                              "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                              "mfu": tokens_per_s * flops / (peak * devices) if peak and not first else None,
                              "memory_gib": device_memory_gib(), "unix_time": time.time()}
                    if first:
                        record["first_step_s"] = now - last_log_time
                    last_log_step, last_log_time = step, now
                    logger.log(record)
                    show(format_record(record))
                    if on_step is not None:
                        on_step(step, record)
                if validator is not None and due(config, step):
                    validation = {"step": step} | validator(state)
                    logger.log(validation)
                    show(format_validation(validation))
                    summary_validation = validation
                if saving:
                    checkpointer.save(step, state._replace(frozen=None), stream.state(), force=stopping)
                if stopping:
                    break
        if checkpointer:
            checkpointer.wait()
    finally:
        stream.close()
        progress.close()
        logger.close()
        if checkpointer:
            checkpointer.close()

    finished = step >= t.steps
    if main_process and start >= t.steps:
        print(f"already finished: the checkpoint is at step {start} of training.steps {t.steps}; nothing to train "
              f"(raise --training.steps to train on, or --job.start_over true to start again)", flush=True)
    summary = {"output_dir": str(output_dir.absolute()), "step": step, "finished": finished,
               "resumes_from": resume_step(output_dir), "loss": logger.last_loss() if record is None else record["loss"]}
    if summary_validation is not None:
        summary["val_loss"] = summary_validation["val_loss"]
    if finished and config.checkpoint.export_model:
        if main_process:
            print(f"exporting the model to {output_dir.absolute() / 'model'}", flush=True)
        summary["model"] = str(export_model(graphdef, state, output_dir, model_tokenizer_dir, config))
    if config.metrics.plot:
        plot = logger.plot()
        summary["loss_png"] = None if plot is None else str(plot)
    if main_process:
        print(json.dumps(summary), flush=True)
    return summary


def wandb_settings(config: TrainConfig) -> dict | None:
    """``wandb.init``'s arguments when ``metrics.wandb`` is on: the project, the run named after
    the output folder (or ``job.description``), the resolved config, files beside the run's."""
    if not config.metrics.wandb:
        return None
    output_dir = Path(config.job.output_dir).absolute()
    return {"project": config.metrics.wandb_project, "name": config.job.description or output_dir.name,
            "dir": str(output_dir), "config": to_dict(config)}


def export_model(graphdef, state, output_dir: Path, model_tokenizer_dir, config: TrainConfig) -> Path:
    """The trained model as a ``jaxflip.models`` checkpoint at ``output_dir/model``, in the
    public layout (scanned layers unstacked). Export is the run's last use of the train state:
    each stacked array is freed once unstacked, so memory stays near one copy of the weights."""
    model = merge_model(graphdef, state.trainable, state.frozen, state.seeds)
    unstack_layers(model, delete_stacked=True)
    source = setup.tokenizer_source(config, model_tokenizer_dir)
    tokenizer_dir = builtin_tokenizer_dir() if source == BUILTIN_TOKENIZER else source
    return save(model, output_dir / "model", tokenizer_dir=tokenizer_dir if Path(tokenizer_dir).is_dir() else None,
                overwrite=True)
