"""``sweep``: a fault campaign in one process: the perplexity of many flip settings, each
under several seeds, with mean and 95% confidence interval, a table and a plot.

Points. Each ``--grid FIELDS=VALUES`` is one curve: FIELDS (a flip field of the base
``--bitflip-config``, or several joined by ``+`` that take the same value, e.g.
``x_p_exp+x_p_frac``) set to each value in turn, every other setting as the base has it.
VALUES is ``0.5^A:0.5^B`` (every halves from A to B; ``0.5^A:0.5^B:STEP`` every STEP-th) or a
comma list of numbers, ``0.5^K`` and ``none``. A base of regex rules gets the value in every
rule that flips. ``--per-layer linear|block|type`` instead flips one target (a Linear, a
decoder block, or one projection in every block) and one bit group (``--groups``) at a time,
at the base's setting for it: a target x group sensitivity map. The clean model is evaluated
once, for the perplexity ratios.

Seeds. Seed s of a point is the point's config with ``base_seed = s`` (independent per-layer
seeds), so it flips what ``eval ppl`` flips with that config; ``--seeds S`` runs
``--first-seed`` (default: the base's ``base_seed``) and the S - 1 after it. Flip settings
(halves, thresholds) are compile-time constants of the kernel and the seeds are ``BitflipSeed``
state, run-time arguments of the compiled forward: each point compiles once and all its
seeds reuse it.

Output (``--output-dir``): ``points/`` holds one JSON per finished point, written whole (aside,
then renamed) as it finishes; a rerun reuses every point whose settings match and computes
only what is missing (new seeds, new points), so an interrupted sweep loses at most the point
in flight. ``sweep.json`` and ``sweep.csv`` are the table (per point: mean and 95% t-interval of
loss and perplexity over the seeds, the ratio to the clean perplexity), ``sweep.png`` the plot
(perplexity against the grid value per curve, or the heatmap of the per-layer map).
``--sample-prompt`` adds each point's greedy continuation of a prompt (first seed): the
tutorial's check that the text stays coherent.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxflip.bitflip import (BitflipConfig, BitFlipLinear, RuleTable, apply_rule_table, calculate_flip_probability,
                             named_linears)
from jaxflip.bitflip.rules import PROBABILITY_KEYS, THRESHOLD_KEYS
from jaxflip.bitflip.seeds import SEED_NAMES
from jaxflip.eval.model_io import open_model, open_tokenizer, resolve_bitflip
from jaxflip.eval.perplexity import add_window_arguments, check_window_arguments, open_windows, perplexity
from jaxflip.eval.report import check_output_path, format_table, write_atomically, write_json
from jaxflip.kernels_pallas.limits import find_nearest_prob_n_halves
from jaxflip.models import generate

FLIP_FIELDS = PROBABILITY_KEYS + THRESHOLD_KEYS
PER_LAYER_TARGETS = ("linear", "block", "type")
CLEAN = "clean"
CONFIDENCE = 0.95
CSV_COLUMNS = ("name", "component", "value", "seeds", "nonfinite_seeds", "loss_mean", "loss_ci95",
               "perplexity_mean", "perplexity_ci95", "perplexity_ratio")


# --- points ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridAxis:
    """One ``--grid``: the flip fields it sets (all to the same value) and its values (None:
    that field off)."""

    fields: tuple[str, ...]
    values: tuple[float | None, ...]

    @property
    def name(self) -> str:
        return "+".join(self.fields)


@dataclass(frozen=True)
class SweepPoint:
    """One flip setting of the sweep: ``name`` (unique, also its file's), the ``component`` it
    belongs to (a grid axis's fields, a per-layer target, or ``clean``), its ``value`` on that
    component (the grid value, or the per-layer bit group) and its config (seeds set per run)."""

    name: str
    component: str
    value: float | str | None
    config: BitflipConfig


def parse_grid(text: str) -> GridAxis:
    """A ``--grid FIELDS=VALUES`` (see the module's doc); values are checked when the point
    configs are built."""
    fields_text, equals, values_text = text.partition("=")
    if not equals or not fields_text or not values_text:
        raise ValueError(f"--grid {text!r}: expected FIELDS=VALUES, e.g. x_p_frac=0.5^6:0.5^16")
    fields = tuple(fields_text.split("+"))
    for field in fields:
        if field not in FLIP_FIELDS:
            raise ValueError(f"--grid {text!r}: unknown flip field {field!r}; flip fields: {', '.join(FLIP_FIELDS)}")
    if len({field in PROBABILITY_KEYS for field in fields}) > 1:
        raise ValueError(f"--grid {text!r}: probabilities and thresholds cannot share one axis")
    if ":" in values_text:
        if fields[0] not in PROBABILITY_KEYS:
            raise ValueError(f"--grid {text!r}: a 0.5^A:0.5^B range is for probabilities; list thresholds with commas")
        parts = values_text.split(":")
        halves = [_halves(text, part) for part in parts[:2]]
        step = _step(text, parts[2]) if len(parts) == 3 else 1
        if len(parts) > 3:
            raise ValueError(f"--grid {text!r}: a range is 0.5^A:0.5^B or 0.5^A:0.5^B:STEP")
        direction = 1 if halves[1] >= halves[0] else -1
        values = tuple(0.5**k for k in range(halves[0], halves[1] + direction, direction * step))
    else:
        values = tuple(_value(text, item) for item in values_text.split(","))
    return GridAxis(fields, values)


def _halves(text: str, item: str) -> int:
    match = re.fullmatch(r"0\.5\^(\d+)", item.strip())
    if match is None:
        raise ValueError(f"--grid {text!r}: range ends must be 0.5^K, got {item!r}")
    return int(match.group(1))


def _step(text: str, item: str) -> int:
    if not item.strip().isdigit() or int(item) < 1:
        raise ValueError(f"--grid {text!r}: a range's STEP must be an integer >= 1, got {item!r}")
    return int(item)


def _value(text: str, item: str) -> float | None:
    item = item.strip()
    if item.lower() in ("none", "null"):
        return None
    if re.fullmatch(r"0\.5\^\d+", item):
        return 0.5**_halves(text, item)
    try:
        return float(item)
    except ValueError:
        raise ValueError(f"--grid {text!r}: {item!r} is not a number, 0.5^K or none") from None


def format_value(field: str, value: float | None) -> str:
    """A grid value as its point's name shows it: a probability as the ``0.5^K`` it snaps to."""
    if value is None:
        return "none"
    if field in PROBABILITY_KEYS and 0 < value < 1:
        return f"0.5^{find_nearest_prob_n_halves(value)}"
    return f"{value:g}"


def with_settings(base: BitflipConfig, settings: Mapping[str, float | None]) -> BitflipConfig:
    """``base`` with these flip fields set: the fields themselves, or, for a base of regex
    rules, the same keys in every rule that flips. Checked by ``BitflipConfig`` (the error
    names the field)."""
    if base.rules is None:
        return dataclasses.replace(base, **settings)
    rules = {pattern: {**rule, **settings} if _flips(rule) else rule for pattern, rule in base.rule_mapping().items()}
    return dataclasses.replace(base, rules=rules)


def _flips(rule) -> bool:
    return isinstance(rule, Mapping) and any(rule.get(key) is not None for key in FLIP_FIELDS)


def grid_points(base: BitflipConfig, axes: Sequence[GridAxis]) -> list[SweepPoint]:
    """The points of the grid axes in order, each axis varied alone; two values that snap to
    the same flips are one point."""
    points = {}
    for axis in axes:
        for value in axis.values:
            name = f"{axis.name}={format_value(axis.fields[0], value)}"
            try:
                config = with_settings(base, dict.fromkeys(axis.fields, value))
            except ValueError as error:
                raise ValueError(f"--grid {name}: {error}") from None
            points.setdefault(name, SweepPoint(name, axis.name, value, config))
    return list(points.values())


def per_layer_target(layer: str, target: str) -> str:
    """What ``--per-layer target`` flips a layer with: the layer itself, its decoder block
    (``model.layers.3``) or its projection in every block (``mlp.up_proj``)."""
    match = re.fullmatch(r"(.*layers\.\d+)\.(.+)", layer)
    if target == "linear" or match is None:
        return layer
    return match.group(1) if target == "block" else match.group(2)


def per_layer_points(base: BitflipConfig, table: RuleTable, target: str, groups: Sequence[str]) -> list[SweepPoint]:
    """One point per target and bit group that the base flips: the group alone on the target's
    layers, at each layer's own base setting (with its tensor's zero-out threshold)."""
    targets: dict[str, list] = {}
    for row in table:
        if row.flipped:
            targets.setdefault(per_layer_target(row.layer, target), []).append(row)
    points = []
    for name, rows in targets.items():
        for group in groups:
            tensor, bits = group[0], group.rsplit("_", 1)[1]
            rules = {}
            for row in rows:
                flip = getattr(row, f"{tensor}_flip")
                halves = getattr(flip, f"{bits}_halves")
                if halves is not None:
                    rules[re.escape(row.layer)] = {group: calculate_flip_probability(halves),
                                                   f"{tensor}_zero_out_t": flip.zero_out_t}
            if rules:
                points.append(SweepPoint(f"{name} {group}", name, group, dataclasses.replace(base, rules=rules)))
    return points


def clean_point(base: BitflipConfig) -> SweepPoint:
    return SweepPoint(CLEAN, CLEAN, None, dataclasses.replace(base, enable=False))


# --- running and resuming --------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    """Greedy continuations of ``prompts`` for every point (the coherence check)."""

    tokenizer: object
    prompts: tuple[str, ...]
    max_new_tokens: int

    def settings(self) -> dict:
        return {"prompts": list(self.prompts), "max_new_tokens": self.max_new_tokens}

    def texts(self, model) -> list[str]:
        texts = []
        for prompt in self.prompts:
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            tokens = generate(model, jnp.asarray([prompt_ids], jnp.int32), self.max_new_tokens,
                              eos_token_id=self.tokenizer.eos_token_id)
            texts.append(self.tokenizer.decode([int(t) for t in np.asarray(tokens[0, len(prompt_ids):])],
                                               skip_special_tokens=True))
        return texts


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples as lists), for comparing with a stored record."""
    return json.loads(json.dumps(value))


class PointStore:
    """The finished points of one sweep folder: ``points/NAME.json`` each, holding the
    evaluation ``settings`` and the point's config it was computed with; a record whose settings
    or config differ from the current ones is not reused."""

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder) / "points"
        self.settings = _jsonable(settings)

    def path(self, point: SweepPoint) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9._=^+-]", "_", point.name) + ".json")

    def load(self, point: SweepPoint) -> dict:
        """The point's record so far: what a matching stored record holds, else nothing yet."""
        fresh = {"name": point.name, "component": point.component, "value": point.value,
                 "settings": self.settings, "bitflip": _jsonable(dataclasses.asdict(point.config)), "seeds": {}}
        path = self.path(point)
        if not path.is_file():
            return fresh
        stored = json.loads(path.read_text())
        if stored.get("settings") != fresh["settings"] or stored.get("bitflip") != fresh["bitflip"]:
            return fresh
        # JSON has no NaN: write_json stored a non-finite loss as null
        stored["seeds"] = {seed: {key: math.nan if value is None else value for key, value in result.items()}
                           for seed, result in stored["seeds"].items()}
        return stored

    def save(self, point: SweepPoint, record: dict) -> None:
        write_json(self.path(point), record)


def point_seeds(point: SweepPoint, seeds: Sequence[int]) -> list[int]:
    """The seeds a point runs: all, or the first one for the clean model (no flips to seed)."""
    return list(seeds[:1]) if point.component == CLEAN else list(seeds)


def set_starting_seeds(linears: Mapping[str, BitFlipLinear], table: RuleTable) -> None:
    """The starting seeds of ``table`` on Linears whose flips ``apply_rule_table`` set already,
    as host int32 values: the compiled forward takes them as arguments, copied in the call.
    ``configure``'s eager device scalars cost about 0.1 ms each, four per Linear: 80 ms per seed
    at aixsim-60M's 155 Linears on the 2-core VM (these host values: 4 ms), the order of a
    GPU forward of 16 x 2048 tokens."""
    for row in table:
        for name, seed in zip(SEED_NAMES, row.seeds):
            getattr(linears[row.layer], name).set_value(np.int32(seed))


def run_points(model, windows: np.ndarray, batch_size: int, points: Sequence[SweepPoint], seeds: Sequence[int],
               store: PointStore, samples: Samples | None = None) -> dict[str, dict]:
    """Every point under every seed (what ``store`` holds already is skipped), each point saved
    to ``store`` once all its seeds are done; returns each point's record by name."""
    linears = named_linears(model)
    layer_names = list(linears)
    records = {point.name: store.load(point) for point in points}
    missing = {point.name: [seed for seed in point_seeds(point, seeds) if str(seed) not in records[point.name]["seeds"]]
               for point in points}
    with tqdm(total=sum(map(len, missing.values())), desc="sweep", unit="eval") as progress:
        for point in points:
            record = records[point.name]
            wants_samples = samples is not None and record.get("samples", {}).get("settings") != samples.settings()
            if not missing[point.name] and not wants_samples:
                continue
            progress.set_postfix_str(point.name)
            apply_rule_table(model, point.config.match(layer_names))  # the point's flips; seeds set per seed
            for seed in missing[point.name]:
                # the seeds are state, not part of the compiled forward: only a point's first seed compiles
                set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seed).match(layer_names))
                row = perplexity(model, windows, batch_size, point.name, progress_bar=False)
                record["seeds"][str(seed)] = {"loss": row.loss, "perplexity": row.perplexity}
                progress.update(1)
            if wants_samples:
                set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seeds[0]).match(layer_names))
                record["samples"] = {"settings": samples.settings(), "seed": seeds[0], "texts": samples.texts(model)}
            store.save(point, record)
    return records


# --- the table and the plot ------------------------------------------------------------------

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


# --- the command -----------------------------------------------------------------------------

def add_arguments(parser) -> None:
    add_window_arguments(parser)
    parser.add_argument("--output-dir", required=True,
                        help="the sweep's folder: finished points, table, plot; a rerun resumes it")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELDS=VALUES",
                        help="one curve: e.g. x_p_frac=0.5^6:0.5^16, w_p_exp+w_p_frac=0.5^8,0.5^12, "
                             "x_zero_out_t=10,30,100 (repeat for more curves)")
    parser.add_argument("--per-layer", choices=PER_LAYER_TARGETS, default=None,
                        help="flip one target (each Linear, decoder block or projection type) and one bit group "
                             "at a time, at the base's settings: a sensitivity map")
    parser.add_argument("--groups", default=",".join(PROBABILITY_KEYS),
                        help="the bit groups of --per-layer (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per point (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="the first seed (default: the base config's base_seed, 0 if unset)")
    parser.add_argument("--sample-prompt", action="append", default=[],
                        help="also record each point's greedy continuation of this prompt (repeatable)")
    parser.add_argument("--sample-tokens", type=int, default=30, help="tokens per sample (default: %(default)s)")


def check_arguments(args) -> None:
    check_window_arguments(args)
    if args.bitflip_config is None:
        raise ValueError("sweep needs --bitflip-config: the base settings that the points vary")
    if bool(args.grid) == (args.per_layer is not None):
        raise ValueError("sweep needs either --grid (one or more) or --per-layer")
    args.grid_axes = [parse_grid(text) for text in args.grid]
    args.group_list = [group.strip() for group in args.groups.split(",")]
    for group in args.group_list:
        if group not in PROBABILITY_KEYS:
            raise ValueError(f"--groups: unknown bit group {group!r}; groups: {', '.join(PROBABILITY_KEYS)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed is not None and args.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.sample_tokens < 1:
        raise ValueError(f"--sample-tokens must be >= 1, got {args.sample_tokens}")
    if any(not prompt for prompt in args.sample_prompt):
        raise ValueError("--sample-prompt is empty")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output-dir {args.output_dir} is a file, not a folder")
    check_output_path(Path(args.output_dir) / "sweep.json", flag="--output-dir")


def evaluation_settings(args, windows: np.ndarray) -> dict:
    """What a point's results depend on besides its flips: a stored point is reused only under
    the same settings."""
    return {"checkpoint": args.checkpoint, "tokenizer": args.tokenizer, "dtype": args.dtype, "dataset": args.dataset,
            "split": args.split, "subset": args.subset, "text_field": args.text_field, "seq_len": args.seq_len,
            "sequences": len(windows), "batch_size": args.batch_size}


def _or_dash(value):
    return "-" if value is None else value


def run(args) -> dict:
    base = args.bitflip
    if base.seed_mode == "reference":
        raise ValueError(f"{args.bitflip_config}: seed_mode 'reference' gives every seed the same flips; the sweep's "
                         f"seeds are base seeds (independent per-layer seeds): remove seed_mode")
    first_seed = base.resolved_base_seed if args.first_seed is None else args.first_seed
    seeds = list(range(first_seed, first_seed + args.seeds))
    points = grid_points(base, args.grid_axes)  # every grid value checked before the model is opened
    model, tokenizer_dir = open_model(args.checkpoint, dtype=args.dtype)
    setup = resolve_bitflip(model, args)
    if args.per_layer is not None:
        points = per_layer_points(base, setup.table, args.per_layer, args.group_list)
        if not points:
            raise ValueError(f"{args.bitflip_config}: flips none of the groups {', '.join(args.group_list)}")
    points = [clean_point(base), *points]
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    windows = open_windows(args, model, tokenizer)
    store = PointStore(args.output_dir, evaluation_settings(args, windows))
    samples = Samples(tokenizer, tuple(args.sample_prompt), args.sample_tokens) if args.sample_prompt else None
    print(f"sweep: {len(points) - 1} points x {len(seeds)} seeds (+ clean) of {len(windows)} sequences; each point's "
          f"first seed compiles its flips, the other seeds reuse it", flush=True)
    records = run_points(model, windows, args.batch_size, points, seeds, store, samples)
    rows = summarize(points, records, seeds)
    payload = {"command": "sweep", **store.settings, "output_dir": args.output_dir, "seeds": seeds,
               "base_bitflip": setup.summary(), "mode": f"per-layer {args.per_layer}" if args.per_layer else "grid",
               "confidence": CONFIDENCE, "files": output_files(args.output_dir), "points": rows}
    write_outputs(payload, rows, args.per_layer is not None)
    print(format_table(["point", "seeds", "loss", "+-95%", "perplexity", "+-95%", "ratio"],
                       [[row["name"], row["seeds"], row["loss_mean"], _or_dash(row["loss_ci95"]), row["perplexity_mean"],
                         _or_dash(row["perplexity_ci95"]), row["perplexity_ratio"]] for row in rows]))
    for row in rows:
        for prompt, text in row.get("samples", {}).items():
            # escaped (newlines as \n): a continuation of blank lines shows, and each point's is one line
            print(f"{row['name']}: {json.dumps(prompt + text, ensure_ascii=False)}")
    print(f"table: {payload['files']['json']}, {payload['files']['csv']}; plot: {payload['files']['png']}")
    return payload
