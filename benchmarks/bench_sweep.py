"""``eval sweep``'s cost (issues 22, 25): a 6-point x 8-seed sweep of a random aixsim-60M at
16 x 2048 tokens against one compile and 48 forwards of its evaluation, and a per-layer map.

    PYTHONPATH=$PWD python benchmarks/bench_sweep.py --out $OUT/bench_sweep.json      # GPU
    PYTHONPATH=$PWD python benchmarks/bench_sweep.py --flavor aixsim-debug --layers 1 --seq-len 16 --batch 2 \\
        --points 2 --seeds 2 --skip-patterns lm_head,self_attn,gate_proj,down_proj    # CPU check, seconds

The model is built in-process with random weights (no hub), sharded over every visible
device as the eval commands shard a checkpoint; the tokens are random. The base flips are the
reference recipe's (0.5^16 on both groups of every Linear's x and W but the LM head, zero-out
30 / 1.25) and the points vary ``x_p_frac`` from 0.5^6 by halves. Each timing starts with
JAX's in-memory caches cleared (``jax.clear_caches``; run with the persistent compilation cache
off, as ``device_env.sh`` sets it), so each pays its compiles:

* ``reference``: one compile and points x seeds forwards of one point's evaluation, each synced
  to the host as the sweep syncs it;
* ``sweep``: ``run_points`` over the clean point, all points and seeds into a fresh folder,
  compiling included: setting each point's flips and each seed's seeds, the forwards, one point
  file per point. The bar: sweep <= 1.3 x reference;
* ``per-layer`` (``--per-layer-groups``, '' skips it): the per-layer map of every flipped
  Linear x those groups (one seed each) with ``run_points``, compiling included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from jaxflip.bitflip import BitflipConfig, apply_rule_table, named_linears
from jaxflip.eval.perplexity import perplexity
from jaxflip.eval.sweep.points import clean_point, grid_points, parse_grid, per_layer_points
from jaxflip.eval.sweep.runner import PointStore, run_points
from jaxflip.models import get_flavor
from jaxflip.models.create import create_random_llama
from jaxflip.models.sharding import make_mesh

REFERENCE_RECIPE = dict(x_p_exp=0.5**16, x_p_frac=0.5**16, x_zero_out_t=30.0,
                        w_p_exp=0.5**16, w_p_frac=0.5**16, w_zero_out_t=1.25, base_seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="aixsim-60M")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the flavor's)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="sequences, all in one forward")
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--skip-patterns", default="lm_head",
                        help="comma list of layer-name substrings left unflipped (default: %(default)s; fewer flipped "
                             "layers compile quicker)")
    parser.add_argument("--per-layer-groups", default="x_p_exp,x_p_frac",
                        help="bit groups of the per-layer map ('' skips it; default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the timings here as JSON")
    args = parser.parse_args()

    changes = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = get_flavor(args.flavor, **changes)
    model = create_random_llama(config, make_mesh(), seed=0)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
    base = BitflipConfig(**REFERENCE_RECIPE, skip_patterns=args.skip_patterns.split(","))
    points = grid_points(base, [parse_grid(f"x_p_frac=0.5^6:0.5^{5 + args.points}")])
    seeds = list(range(args.seeds))
    settings = {"bench": "bench_sweep"}

    evaluations = len(points) * len(seeds)
    result = {"flavor": args.flavor, "layers": config.num_hidden_layers, "tokens": [args.batch, args.seq_len],
              "points": len(points), "seeds": len(seeds), "devices": jax.device_count(),
              "device": jax.devices()[0].device_kind}
    print(f"{len(points)} points x {len(seeds)} seeds, {args.flavor} ({config.num_hidden_layers} layers), "
          f"{args.batch} x {args.seq_len} tokens, {jax.device_count()} x {result['device']}", flush=True)

    jax.clear_caches()
    apply_rule_table(model, points[0].config.match(named_linears(model)))
    start = time.perf_counter()
    perplexity(model, windows, args.batch, "compile", progress_bar=False)
    result["reference_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(evaluations - 1):
        perplexity(model, windows, args.batch, "forward", progress_bar=False)
    result["reference_s"] = result["reference_compile_s"] + time.perf_counter() - start
    print(f"reference: one compile and {evaluations} forwards {result['reference_s']:.2f} s "
          f"(first, with the compile: {result['reference_compile_s']:.2f} s)", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        jax.clear_caches()
        start = time.perf_counter()
        run_points(model, windows, args.batch, [clean_point(base), *points], seeds,
                   PointStore(f"{folder}/sweep", settings))
        result["sweep_s"] = time.perf_counter() - start
        result["ratio"] = result["sweep_s"] / result["reference_s"]
        print(f"sweep (clean + {evaluations}, compiling included): {result['sweep_s']:.2f} s, "
              f"ratio {result['ratio']:.3f} (bar <= 1.3)", flush=True)

        if args.per_layer_groups:
            layer_names = list(named_linears(model))
            cells = per_layer_points(base, base.match(layer_names), "linear", args.per_layer_groups.split(","))
            jax.clear_caches()
            start = time.perf_counter()
            run_points(model, windows, args.batch, [clean_point(base), *cells], seeds[:1],
                       PointStore(f"{folder}/per_layer", settings))
            result["per_layer_cells"] = len(cells)
            result["per_layer_s"] = time.perf_counter() - start
            print(f"per-layer map: {len(cells)} cells (every flipped Linear x {args.per_layer_groups}) + clean, "
                  f"one seed, compiling included: {result['per_layer_s']:.1f} s (bar < 180 s)", flush=True)

    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
