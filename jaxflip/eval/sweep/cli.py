"""The ``sweep`` command: its arguments, their checks, and the run from the model to the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxflip.bitflip.rules import PROBABILITY_KEYS
from jaxflip.eval.model_io import open_model, open_tokenizer, resolve_bitflip
from jaxflip.eval.perplexity import add_window_arguments, check_window_arguments, open_windows
from jaxflip.eval.report import check_output_path, format_table
from jaxflip.eval.sweep.points import (CLEAN, PER_LAYER_TARGETS, clean_point, grid_points, parse_grid, parse_shard,
                                       per_layer_points)
from jaxflip.eval.sweep.report import CONFIDENCE, output_files, summarize, write_outputs
from jaxflip.eval.sweep.runner import PointStore, Samples, run_points


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
    parser.add_argument("--seeds", type=int, default=4,
                        help="seeds per point; with --ci-width, the most a point runs (default: %(default)s)")
    parser.add_argument("--ci-width", type=float, default=None, metavar="W",
                        help="run seeds in rounds, one more per round to each point whose perplexity ratio to "
                             "clean has a 95%% interval of full width W or more (upper minus lower end, twice the "
                             "table's perplexity_ratio_ci95), from 2 seeds up to --seeds; a point with a non-finite "
                             "perplexity stops (no interval). E.g. 0.01: the ratio to +-0.5%%")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="compute only the K-th of N shares of the points (point i, from 0, in share i %% N + 1) "
                             "into --output-dir, and write no table; every share also evaluates the clean model. "
                             "Once all N are done, the same command without --shard merges them")
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
    if args.ci_width is not None and not (math.isfinite(args.ci_width) and args.ci_width > 0):
        raise ValueError(f"--ci-width must be a number > 0, got {args.ci_width:g}")
    if args.ci_width is not None and args.seeds < 2:
        raise ValueError(f"--ci-width needs --seeds >= 2 (an interval needs two seeds), got {args.seeds}")
    args.shard_of = parse_shard(args.shard) if args.shard is not None else None
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


def print_table(rows: list[dict], ci_width: float | None) -> None:
    headers = ["point", "seeds", "loss", "+-95%", "perplexity", "+-95%", "ratio", "+-95%"]
    lines = [[row["name"], row["seeds"], row["loss_mean"], _or_dash(row["loss_ci95"]), row["perplexity_mean"],
              _or_dash(row["perplexity_ci95"]), row["perplexity_ratio"], _or_dash(row["perplexity_ratio_ci95"])]
             for row in rows]
    if ci_width is not None:  # how many seeds each point needed, and why it stopped
        headers.append("stopped by")
        for line, row in zip(lines, rows):
            line.append(row["stopped_by"])
    print(format_table(headers, lines))


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
    all_points = len(points)
    shard = args.shard_of
    if shard is not None:
        points = shard.points(points)
    points = [clean_point(base), *points]
    # every shard evaluates the clean model (one forward set) for its ratios, but only shard 1
    # writes its file: no two processes write one file of the shared folder
    unsaved = {CLEAN} if shard is not None and shard.index != 1 else set()
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    windows = open_windows(args, model, tokenizer)
    store = PointStore(args.output_dir, evaluation_settings(args, windows))
    samples = Samples(tokenizer, tuple(args.sample_prompt), args.sample_tokens) if args.sample_prompt else None
    share = f"shard {shard}: {len(points) - 1} of {all_points} points" if shard is not None else f"{all_points} points"
    per_point = (f"2 to {len(seeds)} seeds, until the ratio's 95% interval is narrower than {args.ci_width:g}"
                 if args.ci_width is not None else f"{len(seeds)} seeds")
    print(f"sweep: {share} x {per_point} (+ clean) of {len(windows)} sequences; compiling is paid once per distinct "
          f"program, the seeds are run-time state", flush=True)
    records = run_points(model, windows, args.batch_size, points, seeds, store, samples, ci_width=args.ci_width,
                         unsaved=unsaved)
    rows = summarize(points, records, seeds, args.ci_width)
    payload = {"command": "sweep", **store.settings, "output_dir": args.output_dir, "seeds": seeds,
               "ci_width": args.ci_width, "shard": None if shard is None else str(shard),
               "base_bitflip": setup.summary(), "mode": f"per-layer {args.per_layer}" if args.per_layer else "grid",
               "confidence": CONFIDENCE, "files": {} if shard is not None else output_files(args.output_dir),
               "points": rows}
    if shard is None:
        write_outputs(payload, rows, args.per_layer is not None)
    print_table(rows, args.ci_width)
    for row in rows:
        for prompt, text in row.get("samples", {}).items():
            # escaped (newlines as \n): a continuation of blank lines shows, and each point's is one line
            print(f"{row['name']}: {json.dumps(prompt + text, ensure_ascii=False)}")
    if shard is not None:
        print(f"shard {shard}: its points are in {store.folder}; no table or plot written (a shard has only its "
              f"share). Once every shard is done, run this command without --shard over the same --output-dir: it "
              f"merges every shard's points into sweep.json, sweep.csv and sweep.png, computing nothing that is there")
    else:
        print(f"table: {payload['files']['json']}, {payload['files']['csv']}; plot: {payload['files']['png']}")
    return payload
