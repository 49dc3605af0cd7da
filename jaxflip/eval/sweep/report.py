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
from jaxflip.eval.sweep.points import CLEAN, SweepPoint, held_seeds, point_seeds

CONFIDENCE = 0.95
CSV_COLUMNS = ("name", "component", "value", "seeds", "nonfinite_seeds", "loss_mean", "loss_ci95",
               "perplexity_mean", "perplexity_ci95", "perplexity_ratio", "perplexity_ratio_ci95", "stopped_by")


def mean_and_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student-t confidence interval (None for one value)."""
    from scipy import stats  # here: the other eval commands need no scipy

    values = np.asarray(values, np.float64)
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def clean_perplexity(points: Sequence[SweepPoint], records: Mapping[str, dict]) -> float | None:
    """The clean point's perplexity (deterministic: one seed), or None while it has none."""
    clean = next((records[p.name] for p in points if p.component == CLEAN), None)
    return next(iter(clean["seeds"].values()))["perplexity"] if clean is not None and clean["seeds"] else None


def ratio_interval_width(perplexities: Sequence[float], clean: float) -> float:
    """The full width of the 95% interval of the perplexity ratio to ``clean`` (twice the
    table's ``perplexity_ratio_ci95``): the clean perplexity has no interval of its own, so it is
    the perplexities' interval over ``clean``. Needs two perplexities or more."""
    return 2 * mean_and_interval(perplexities)[1] / clean


def summarize(points: Sequence[SweepPoint], records: Mapping[str, dict], seeds: Sequence[int],
              ci_width: float | None = None) -> list[dict]:
    """One row per point: the results of the seeds it used (``held_seeds``), their mean and
    interval, the perplexity ratio to the clean point's and its interval, and why the point
    stopped (``stopped_by``): ``seeds`` (it ran every seed), ``ci-width`` (its ratio's interval
    got narrower than ``ci_width``), ``nonfinite`` (a seed's perplexity was not finite: with
    ``ci_width``, no interval, no more seeds) or ``clean``."""
    clean = clean_perplexity(points, records)
    rows = []
    for point in points:
        record = records[point.name]
        per_seed = [{"seed": seed, **record["seeds"][str(seed)]} for seed in held_seeds(record, point_seeds(point, seeds))]
        loss_mean, loss_ci = mean_and_interval([r["loss"] for r in per_seed])
        perplexity_mean, perplexity_ci = mean_and_interval([r["perplexity"] for r in per_seed])
        nonfinite_seeds = sum(not math.isfinite(r["loss"]) for r in per_seed)
        ratio_ci = None if clean is None or perplexity_ci is None else perplexity_ci / clean
        if point.component == CLEAN:
            stopped_by = "clean"
        elif ci_width is not None and nonfinite_seeds:
            stopped_by = "nonfinite"
        elif ci_width is not None and ratio_ci is not None and 2 * ratio_ci < ci_width:
            stopped_by = "ci-width"
        else:
            stopped_by = "seeds"
        row = {"name": point.name, "component": point.component, "value": point.value, "seeds": len(per_seed),
               "nonfinite_seeds": nonfinite_seeds, "loss_mean": loss_mean, "loss_ci95": loss_ci,
               "perplexity_mean": perplexity_mean, "perplexity_ci95": perplexity_ci,
               "perplexity_ratio": None if clean is None else perplexity_mean / clean,
               "perplexity_ratio_ci95": ratio_ci, "stopped_by": stopped_by, "per_seed": per_seed}
        if "samples" in record:
            row["samples"] = dict(zip(record["samples"]["settings"]["prompts"], record["samples"]["texts"]))
        rows.append(row)
    return rows


def seed_counts(rows: Sequence[dict]) -> str:
    """The seeds per point of ``rows`` for a title: ``4``, or ``2-8`` where ``--ci-width`` stopped some early."""
    counts = sorted({row["seeds"] for row in rows})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


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
            perplexity_axis(axis, [row["perplexity_mean"] + sign * (row["perplexity_ci95"] or 0)
                                   for component in panel for row in curves[component] for sign in (-1, 1)]
                            + ([clean["perplexity_mean"]] if clean is not None else []))
            axis.set(xlabel="flip probability" if probability else panel[0], ylabel="perplexity",
                     title=f"perplexity, mean and {CONFIDENCE:.0%} CI over {seed_counts(flipped)} seeds")
            axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def perplexity_axis(axis, values: Sequence[float]) -> None:
    """The y axis of ``values`` (perplexities) with plain tick labels (736, not matplotlib's
    7.36x10^2 on a log axis): linear while the finite values stay within a factor 10, else
    logarithmic, labelled at its powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = [value for value in values if math.isfinite(value) and value > 0]
    if finite and max(finite) > 10 * min(finite):
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.10g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    else:
        axis.ticklabel_format(axis="y", style="plain", useOffset=False)


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
    axis.set_title(f"sensitivity: mean of {seed_counts(rows)} seeds" if rows else "sensitivity")
    return figure


def output_files(folder: str | Path) -> dict[str, str]:
    return {kind: str(Path(folder) / f"sweep.{kind}") for kind in ("json", "csv", "png")}


def write_outputs(payload: dict, rows: Sequence[dict], per_layer: bool) -> None:
    """The files of ``payload["files"]`` (``output_files``), each written atomically."""
    files = payload["files"]
    write_json(files["json"], payload)
    write_atomically(files["csv"], table_csv(rows))
    write_atomically(files["png"], plot(rows, per_layer))
