"""The sweep's results: each point's mean and 95% interval over its seeds, the table (CSV,
JSON) and the plot."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxflip.bitflip.rules import PROBABILITY_KEYS, THRESHOLD_KEYS
from jaxflip.eval.report import write_atomically, write_json
from jaxflip.eval.sweep.points import CLEAN, SweepPoint
from jaxflip.eval.sweep.runner import point_seeds

CONFIDENCE = 0.95
CSV_COLUMNS = ("name", "component", "value", "seeds", "nonfinite_seeds", "loss_mean", "loss_ci95",
               "perplexity_mean", "perplexity_ci95", "perplexity_ratio")


def mean_and_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student-t confidence interval (None for one value)."""
    from scipy import stats  # here: the other eval commands need no scipy

    values = np.asarray(values, np.float64)
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def summarize(points: Sequence[SweepPoint], records: Mapping[str, dict], seeds: Sequence[int]) -> list[dict]:
    """One row per point: its seeds' results and their mean and interval; the perplexity ratio
    is to the clean point's."""
    clean = next((records[p.name] for p in points if p.component == CLEAN), None)
    clean_perplexity = next(iter(clean["seeds"].values()))["perplexity"] if clean is not None else None
    rows = []
    for point in points:
        record = records[point.name]
        per_seed = [{"seed": seed, **record["seeds"][str(seed)]} for seed in point_seeds(point, seeds)]
        loss_mean, loss_ci = mean_and_interval([r["loss"] for r in per_seed])
        perplexity_mean, perplexity_ci = mean_and_interval([r["perplexity"] for r in per_seed])
        row = {"name": point.name, "component": point.component, "value": point.value, "seeds": len(per_seed),
               "nonfinite_seeds": sum(not math.isfinite(r["loss"]) for r in per_seed),
               "loss_mean": loss_mean, "loss_ci95": loss_ci, "perplexity_mean": perplexity_mean,
               "perplexity_ci95": perplexity_ci,
               "perplexity_ratio": None if clean_perplexity is None else perplexity_mean / clean_perplexity,
               "per_seed": per_seed}
        if "samples" in record:
            row["samples"] = dict(zip(record["samples"]["settings"]["prompts"], record["samples"]["texts"]))
        rows.append(row)
    return rows


def table_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(rows: Sequence[dict], per_layer: bool) -> bytes:
    """The PNG of the sweep: the per-layer heatmap, or perplexity against the grid value per
    curve (probabilities on one log axis, each threshold axis on its own) with 95% error bars
    and the clean perplexity dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next((row for row in rows if row["component"] == CLEAN), None)
    flipped = [row for row in rows if row["component"] != CLEAN]
    if per_layer:
        figure = _heatmap(plt, flipped)
    else:
        curves: dict[str, list[dict]] = {}
        for row in flipped:
            if row["value"] is not None:  # "none" has no place on the axis; it stays in the table
                curves.setdefault(row["component"], []).append(row)
        panels = [[c for c in curves if c.split("+")[0] in PROBABILITY_KEYS]] + [[c] for c in curves
                                                                                 if c.split("+")[0] in THRESHOLD_KEYS]
        panels = [panel for panel in panels if panel]
        figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for axis, panel in zip(axes[0], panels):
            for component in panel:
                curve = sorted(curves[component], key=lambda row: row["value"])
                axis.errorbar([row["value"] for row in curve], [row["perplexity_mean"] for row in curve],
                              yerr=[row["perplexity_ci95"] or 0 for row in curve], marker="o", capsize=3,
                              label=component)
            if clean is not None:
                axis.axhline(clean["perplexity_mean"], color="gray", linestyle="--", label="clean")
            probability = panel[0].split("+")[0] in PROBABILITY_KEYS
            values = [row["value"] for component in panel for row in curves[component]]
            if probability:
                axis.set_xscale("log", base=2)  # the kernel's probabilities are powers of 1/2
            elif min(values) > 0:
                axis.set_xscale("log")
            axis.set(yscale="log",
                     xlabel="flip probability" if probability else panel[0], ylabel="perplexity",
                     title=f"perplexity, mean and {CONFIDENCE:.0%} CI over {flipped[0]['seeds']} seeds")
            axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _heatmap(plt, rows: Sequence[dict]):
    """Targets down, bit groups across, each cell the mean perplexity ratio to clean."""
    targets = list(dict.fromkeys(row["component"] for row in rows))
    groups = [g for g in PROBABILITY_KEYS if any(row["value"] == g for row in rows)]
    cells = np.full((len(targets), len(groups)), np.nan)
    for row in rows:
        cell = row["perplexity_ratio"] if row["perplexity_ratio"] is not None else row["perplexity_mean"]
        cells[targets.index(row["component"]), groups.index(row["value"])] = cell
    figure, axis = plt.subplots(figsize=(2 + 1.4 * len(groups), 1.5 + 0.35 * len(targets)))
    image = axis.imshow(np.ma.masked_invalid(cells), aspect="auto", cmap="viridis")
    for (i, j), cell in np.ndenumerate(cells):
        axis.text(j, i, "-" if np.isnan(cell) else f"{cell:.4g}", ha="center", va="center", color="white", fontsize=8)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_yticks(range(len(targets)), targets)
    figure.colorbar(image, label="perplexity / clean")
    axis.set_title(f"sensitivity: mean of {rows[0]['seeds']} seeds" if rows else "sensitivity")
    return figure


def output_files(folder: str | Path) -> dict[str, str]:
    return {kind: str(Path(folder) / f"sweep.{kind}") for kind in ("json", "csv", "png")}


def write_outputs(payload: dict, rows: Sequence[dict], per_layer: bool) -> None:
    """The files of ``payload["files"]`` (``output_files``), each written atomically."""
    files = payload["files"]
    write_json(files["json"], payload)
    write_atomically(files["csv"], table_csv(rows))
    write_atomically(files["png"], plot(rows, per_layer))
