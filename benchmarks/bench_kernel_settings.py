"""The kernel with run-time flip settings against the kernel with compile-time settings it
replaced (issue 25) and against mase-triton, in one process on one GPU.

Per dtype and halves (both groups, zero-out 30, seeds 7 and 1007 passed at run time):

* ``run-time``: ``flip_with_setting`` with the setting vector a jit argument, so one compiled
  kernel serves every halves (what the model and the sweep run);
* ``static``: the kernel at commit 0f33edf (halves and threshold compile-time constants), from
  the package that ``benchmarks/static_kernel.sh DIR`` writes (``--static DIR``);
* ``mase``: ``mase_triton``'s ``random_bitflip_fn``.

Forward only, no keep mask (an evaluation's flip). First the run-time kernel is checked bit for
bit against the static one at every row. Median of ``--reps`` synced wall times (jaxflip), of
``triton.testing.do_bench`` (mase). Rows go to ``--out`` as they are measured.

    bash benchmarks/static_kernel.sh .static_kernel            # here (git), then carry .static_kernel
    python3 benchmarks/bench_kernel_settings.py --static .static_kernel --out $OUT/bench_kernel_settings.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

THRESHOLD = 30.0
SEEDS = (7, 1007)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", required=True, help="folder holding the static_kernel package")
    parser.add_argument("--numel", type=int, default=1 << 27)
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--halves", default="1,4,8,12,16,24")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--out", default="bench_kernel_settings.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.static).resolve()))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import triton.testing
    from mase_triton.random_bitflip.functional import random_bitflip_fn
    from bench_kernel import median_ms
    from static_kernel import kernel as static_kernel

    from jaxflip.kernels_pallas.limits import flip_setting
    from jaxflip.kernels_pallas.random_bitflip import flip_with_setting

    def time_jax(fn, *fn_args) -> float:
        return median_ms(fn, *fn_args, reps=args.reps)

    run_time = jax.jit(lambda x, setting, s_exp, s_frac: flip_with_setting(x, setting, s_exp, s_frac,
                                                                           backend="pallas")[0])

    def static_fn(halves):
        def flip(x, scalars):
            return static_kernel.bitflip_pallas(x, scalars, segments=((x.size, 1),), exp_halves=halves,
                                                frac_halves=halves, threshold=THRESHOLD, interpret=False,
                                                with_keep=False)[0]
        return jax.jit(flip)

    seeds = tuple(jnp.int32(s) for s in SEEDS)
    static_scalars = jnp.array([*SEEDS, 0, 0], jnp.uint32)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__,
                  numel=args.numel, threshold=THRESHOLD, seeds=SEEDS, rows=[])
    print(f"jax {jax.__version__} on {result['device']}; {args.numel:,} elements", flush=True)
    print("| dtype | halves | static ms | run-time ms | run-time / static | mase ms | mase / run-time |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    bits = {"float32": jnp.uint32, "float16": jnp.uint16, "bfloat16": jnp.uint16}
    for dtype in args.dtypes.split(","):
        x = (jax.random.normal(jax.random.key(0), (args.numel,), jnp.float32) * 8).astype(dtype)
        x_torch = torch.from_numpy(np.array(x.astype(jnp.float32))).cuda().to(getattr(torch, dtype))
        for halves in (int(h) for h in args.halves.split(",")):
            setting = jnp.asarray(flip_setting(halves, halves, THRESHOLD))
            static = static_fn(halves)
            got = run_time(x, setting, *seeds)
            want = static(x, static_scalars)
            if not bool(jnp.all(jax.lax.bitcast_convert_type(got, bits[dtype])
                                == jax.lax.bitcast_convert_type(want, bits[dtype]))):
                raise SystemExit(f"run-time kernel != static kernel: {dtype} halves {halves}")
            row = dict(dtype=dtype, halves=halves, static_ms=time_jax(static, x, static_scalars),
                       run_time_ms=time_jax(run_time, x, setting, *seeds),
                       mase_ms=triton.testing.do_bench(lambda: random_bitflip_fn(x_torch, halves, halves, *SEEDS,
                                                                                  THRESHOLD),
                                                       warmup=25, rep=150, return_mode="median"))
            result["rows"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(f"| {dtype} | {halves} | {row['static_ms']:.3f} | {row['run_time_ms']:.3f} | "
                  f"{row['run_time_ms'] / row['static_ms']:.3f} | {row['mase_ms']:.3f} | "
                  f"{row['mase_ms'] / row['run_time_ms']:.2f}x |", flush=True)
    print(f"run-time kernel == static kernel, bit for bit, at every row; one compile of the run-time kernel per "
          f"dtype: {run_time._cache_size()} programs for {len(result['rows'])} rows", flush=True)


if __name__ == "__main__":
    main()
