"""Training metrics: console lines, ``metrics.jsonl`` (one object per logged step), TensorBoard
and a loss-curve PNG at the end. Only process 0 writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax


def device_memory_gib() -> float | None:
    """Peak bytes in use on the first local device, if the backend reports it (GPU/TPU do)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)) / 2**30


class StepProgress:
    """The training steps' progress bar (on a terminal only: a redirected or piped run prints
    its log lines and nothing else) and the writer of those lines, which go above the bar.
    The bar starts after the run's first step, which compiles the step: its rate and ETA count
    compiled steps only."""

    def __init__(self, total: int, *, enabled: bool, file=None):
        self.total = total
        self.file = sys.stderr if file is None else file
        self.enabled = enabled and self.file.isatty()
        self.bar = None

    def step(self, step: int) -> None:
        """``step`` has run: the bar starts there (the run's first step) or moves on by one."""
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=self.file)

    def write(self, line: str) -> None:
        """A log line on stdout: above the bar (tqdm clears and redraws it), never glued to it."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _record_step(line: str) -> int | None:
    """The step of a whole ``metrics.jsonl`` record, None for anything else."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MissingPackageError(RuntimeError):
    """An optional backend was asked for and its package is not installed (one line)."""


def _tag(key: str) -> str:
    """TensorBoard / W&B name of a record field: ``val_loss`` -> ``val/loss``, else ``train/...``."""
    return f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"


class MetricsLogger:
    """``wandb``: None, or ``wandb.init``'s keyword arguments (project, name, dir, config):
    every record is then logged to Weights & Biases too; the package is imported only then."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, wandb: dict | None = None):
        self.output_dir = Path(output_dir)
        self.enabled = jax.process_index() == 0
        self.path = self.output_dir / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        if self.enabled and wandb is not None:
            try:
                import wandb as wandb_module
            except ImportError:
                raise MissingPackageError("metrics.wandb: the wandb package is not installed (pip install wandb, "
                                          "or set metrics.wandb false)") from None
            self.wandb_run = wandb_module.init(**wandb)
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, which the run will log again,
        and a last line cut short by a kill mid-write (any line that is not a whole record)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if (logged := _record_step(line)) is not None and logged <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def last_loss(self) -> float | None:
        """The training loss of the last step logged in ``metrics.jsonl`` (by this run or the
        one it resumed), None if none was."""
        if not self.enabled or not self.path.is_file():
            return None
        records = [json.loads(line) for line in self.path.read_text().splitlines() if _record_step(line) is not None]
        losses = [record["loss"] for record in records if "loss" in record]
        return losses[-1] if losses else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {_tag(key): value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def plot(self) -> Path | None:
        """``loss.png`` from ``metrics.jsonl`` (training and validation loss); its absolute path."""
        if not self.enabled or not self.path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        train = [r for r in records if "loss" in r]
        validation = [r for r in records if "val_loss" in r]
        if not train:
            return None
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="training")
        if validation:
            axis.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "o-", label="validation")
            axis.legend()
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        out = self.output_dir.absolute() / "loss.png"
        figure.savefig(out, dpi=120)
        plt.close(figure)
        return out


def format_record(record: dict) -> str:
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3g}",
             f"grad_norm {record['grad_norm']:.3f}"]
    if record.get("first_step_s") is not None:
        parts.append(f"first step {record['first_step_s']:.1f} s (XLA compilation included)")
    else:
        parts.append(f"tokens/s {record['tokens_per_s']:,.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    if record.get("memory_gib") is not None:
        parts.append(f"mem {record['memory_gib']:.1f} GiB")
    return "  ".join(parts)
