"""Table of training runs: ``python benchmarks/summarize_runs.py DIR`` reads every
``DIR/*/metrics.jsonl`` (with ``launch_time``, written by ``gpu_multi.sh``) and prints, per run:
steady tokens/s (median of the steps after the first third), MFU, peak memory, seconds from
launch to the first logged step, and the first losses. Runs named ``*-1gpu-*`` and ``*-2gpu-*``
with the same rest are compared: throughput ratio and largest relative loss difference."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


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
            "first_step_s": first_step_s, "losses": [r["loss"] for r in records[:10]]}


def main(root: str) -> None:
    rows = {row["run"]: row for row in map(summarize, sorted(Path(root).iterdir())) if row is not None}
    print("| run | steps | tokens/s | MFU | peak GiB | first step (s) | loss 1 | loss 10 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        first = "-" if row["first_step_s"] is None else f"{row['first_step_s']:.0f}"
        print(f"| {row['run']} | {row['steps']} | {row['tokens_per_s']:,.0f} | {mfu} | {row['memory_gib']:.1f} | "
              f"{first} | {row['losses'][0]:.4f} | {row['losses'][-1]:.4f} |")
    for name, one in rows.items():
        two = rows.get(name.replace("-1gpu-", "-2gpu-"))
        if "-1gpu-" not in name or two is None:
            continue
        n = min(len(one["losses"]), len(two["losses"]))
        diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"][:n], two["losses"][:n]))
        print(f"{two['run']} / {one['run']}: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s; "
              f"first {n} losses differ by at most {diff:.2e} (relative)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
