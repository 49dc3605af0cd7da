"""Table of training runs: ``python benchmarks/summarize_runs.py DIR`` reads every
``DIR/*/metrics.jsonl`` (with ``launch_time``, written by ``gpu_multi.sh``) and prints, per run:
steady tokens/s (median of the steps after the first third), MFU, peak memory, seconds from
launch to the first logged step, and the first losses; with the ``log.txt`` of a run under
``JAX_LOG_COMPILES=1``, the XLA compile seconds of its step, and with a ``plan.txt`` (the
output of ``--plan``), the plan's total per device next to the peak. Runs named ``*-1gpu-*``
and ``*-Ngpu-*`` with the same rest are compared: throughput ratio (and per GPU) and largest
relative loss difference."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


# jax's message under JAX_LOG_COMPILES for the train step (``make_train_step``'s ``step``)
STEP_COMPILE = re.compile(r"Finished XLA compilation of jit\(step\) in ([0-9.]+) sec")


def step_compile_s(run: Path) -> float | None:
    log = run / "log.txt"
    times = STEP_COMPILE.findall(log.read_text(errors="replace")) if log.is_file() else []
    return float(times[0]) if times else None


def planned_gib(run: Path) -> float | None:
    plan = run / "plan.txt"
    lines = [line for line in plan.read_text().splitlines() if line.startswith("plan: ")] if plan.is_file() else []
    return json.loads(lines[-1][len("plan: "):])[0]["total_gib"] if lines else None


def summarize(run: Path) -> dict | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return None
    steady = records[len(records) // 3:] or records
    launch = run / "launch_time"
    first_step_s = (records[0]["unix_time"] - float(launch.read_text())) if launch.is_file() else None
    return {"run": run.name, "steps": records[-1]["step"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
            "memory_gib": max((r["memory_gib"] or 0) for r in records),
            "first_step_s": first_step_s, "compile_s": step_compile_s(run), "planned_gib": planned_gib(run),
            "losses": [r["loss"] for r in records[:10]]}


def main(root: str) -> None:
    rows = {row["run"]: row for row in map(summarize, sorted(Path(root).iterdir())) if row is not None}
    print("| run | steps | tokens/s | MFU | peak GiB | plan GiB | compile (s) | first step (s) | loss 1 | loss 10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def optional(value, form):
        return "-" if value is None else format(value, form)

    for row in rows.values():
        print(f"| {row['run']} | {row['steps']} | {row['tokens_per_s']:,.0f} | {optional(row['mfu'], '.1%')} | "
              f"{row['memory_gib']:.1f} | {optional(row['planned_gib'], '.1f')} | {optional(row['compile_s'], '.1f')} | "
              f"{optional(row['first_step_s'], '.0f')} | {row['losses'][0]:.4f} | {row['losses'][-1]:.4f} |")
    for name, one in rows.items():
        if "-1gpu-" not in name:
            continue
        for gpus in (2, 4, 8):
            other = rows.get(name.replace("-1gpu-", f"-{gpus}gpu-"))
            if other is None:
                continue
            n = min(len(one["losses"]), len(other["losses"]))
            diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"][:n], other["losses"][:n]))
            ratio = other["tokens_per_s"] / one["tokens_per_s"]
            print(f"{other['run']} / {one['run']}: {ratio:.2f}x tokens/s ({ratio / gpus:.2f}x per GPU); "
                  f"first {n} losses differ by at most {diff:.2e} (relative)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
