"""``eval sweep``'s cost over the forwards it runs (issue 22): a 6-point x 8-seed sweep of a
random aixsim-60M at 16 x 2048 tokens against 48 forwards of one compiled evaluation.

    PYTHONPATH=$PWD python benchmarks/bench_sweep.py --out $OUT/bench_sweep.json      # GPU
    PYTHONPATH=$PWD python benchmarks/bench_sweep.py --flavor aixsim-debug --layers 1 --seq-len 16 --batch 2 \\
        --points 2 --seeds 2 --skip-patterns lm_head,self_attn,gate_proj,down_proj    # CPU check, seconds

The model is built in-process with random weights (no hub), sharded over every visible
device as the eval commands shard a checkpoint; the tokens are random. The base flips are the
reference recipe's (0.5^16 on both groups of every Linear's x and W but the LM head, zero-out
30 / 1.25) and the points vary ``x_p_frac`` from 0.5^6 by halves. Three timings:

* ``compile``: a first sweep with one seed (it pays the compile of every distinct program), not counted;
* ``sweep``: ``run_points`` over all points and seeds into a fresh folder: setting each point's
  flips and each seed's seeds, the forwards, one point file written per point;
* ``forwards``: the compiled evaluation of one point called points x seeds times, each call
  synced to the host as the sweep syncs it.

Prints the three and the ratio sweep / forwards (the bar: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxflip.bitflip import BitflipConfig, apply_rule_table, named_linears
from jaxflip.eval.perplexity import _summed_cross_entropy
from jaxflip.eval.sweep.points import grid_points, parse_grid
from jaxflip.eval.sweep.runner import PointStore, run_points
from jaxflip.models import get_flavor
from jaxflip.models.create import create_random_llama
from jaxflip.models.sharding import make_mesh, on_model_mesh

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

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run_points(model, windows, args.batch, points, [args.seeds], PointStore(f"{folder}/compile", settings))
        compile_s = time.perf_counter() - start

        start = time.perf_counter()
        run_points(model, windows, args.batch, points, seeds, PointStore(f"{folder}/sweep", settings))
        sweep_s = time.perf_counter() - start

    apply_rule_table(model, points[0].config.match(named_linears(model)))
    batch = jnp.asarray(windows)
    with on_model_mesh(model):
        float(_summed_cross_entropy(model, batch))  # compiled already by the sweep: a warm-up call
        start = time.perf_counter()
        for _ in range(len(points) * len(seeds)):
            float(_summed_cross_entropy(model, batch))
        forwards_s = time.perf_counter() - start

    result = {"flavor": args.flavor, "layers": config.num_hidden_layers, "tokens": [args.batch, args.seq_len],
              "points": len(points), "seeds": len(seeds), "devices": jax.device_count(),
              "device": jax.devices()[0].device_kind, "compile_s": compile_s, "sweep_s": sweep_s,
              "forwards_s": forwards_s, "ratio": sweep_s / forwards_s}
    print(f"{len(points)} points x {len(seeds)} seeds, {args.flavor} ({config.num_hidden_layers} layers), "
          f"{args.batch} x {args.seq_len} tokens, {jax.device_count()} x {result['device']}")
    print(f"compile (first sweep, 1 seed): {compile_s:.2f} s")
    print(f"sweep: {sweep_s:.3f} s   {len(points) * len(seeds)} forwards: {forwards_s:.3f} s   "
          f"ratio {result['ratio']:.3f} (bar <= 1.2)")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
