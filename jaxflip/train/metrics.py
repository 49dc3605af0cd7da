"""Training metrics: console lines, ``metrics.jsonl`` (one object per logged step), TensorBoard
and a loss-curve PNG at the end. Only process 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import jax


def device_memory_gib() -> float | None:
    """Peak bytes in use on the first local device, if the backend reports it (GPU/TPU do)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)) / 2**30


def _record_step(line: str) -> int | None:
    """The step of a whole ``metrics.jsonl`` record, None for anything else."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLogger:
    def __init__(self, output_dir: Path, *, tensorboard: bool):
        self.output_dir = Path(output_dir)
        self.enabled = jax.process_index() == 0
        self.path = self.output_dir / "metrics.jsonl"
        self.writer = None
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

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> Path | None:
        """``loss.png`` from ``metrics.jsonl``."""
        if not self.enabled or not self.path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        if not records:
            return None
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot([r["step"] for r in records], [r["loss"] for r in records])
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        out = self.output_dir / "loss.png"
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
