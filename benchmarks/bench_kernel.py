"""jaxflip's Pallas kernel (early exit on and off, per launch) vs mase-triton's kernel, one GPU.

128M elements (1 << 27) by default, float32 / float16 / bfloat16, both groups at the same
halves, zero-out threshold 30 (the issue-12 table), seeds passed at run time (compile-time
seeds s and s+1 let the compiler merge the two groups' shared Philox calls: a fake speedup).

1. Check: at every launch, the kernel equals the jnp path (itself tested bit-exact against
   mase-triton), with and without early exit, so only correct kernels are timed.
2. Launch sweep (bf16, ``--sweep-halves``): every ``--launches`` BLOCK/WARPS with early exit on
   and off; the table uses the fastest early-exit launch.
3. Table: per dtype and halves, forward and forward+backward median ms of mase, jaxflip with
   early exit and jaxflip without, the ratios mase / jaxflip (above 1: jaxflip faster), and
   the expected Philox calls per group with early exit (binomial odds, see
   ``expected_philox_calls``) against the calls without.

Median of ``--reps`` ``block_until_ready`` wall times for jaxflip, ``triton.testing.do_bench``
median for mase. Every row goes to ``--out`` as soon as it is measured.

    PYTHONPATH=$PWD python benchmarks/bench_kernel.py --out $OUT/bench_kernel.json        # GPU
    PYTHONPATH=$PWD python benchmarks/bench_kernel.py --dry --out /tmp/bench_kernel.json  # CPU check

``--dry``: 4096 elements, Pallas in interpret mode and mase-triton in the Triton interpreter
(through ``tests/mase_reference.py``), bf16, halves 5, launches 32/1 and 256/8 unless given:
checks that the script runs (a few minutes on 2 CPU cores), its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

THRESHOLD = 30.0
LAUNCHES = "32/1,64/2,128/4,256/8"
HALVES = "1,2,3,4,5,6,8,10,12,14,16,18,20,22,24"
GROUP_BITS = {"float32": (9, 23), "float16": (6, 10), "bfloat16": (9, 7)}  # masked bits: (sign+exp, fraction)


def expected_philox_calls(halves: int, masked_bits: int, block: int) -> float:
    """Expected Philox calls of one group per block with early exit: the first always runs;
    call k + 1 runs unless all ``masked_bits * block`` bits were cleared by the first
    ``min(4 (k + 1), halves)`` words, each bit surviving one word with probability 1/2."""
    calls = -(-halves // 4)
    expected = 1.0
    for k in range(1, calls):
        survive = 0.5 ** min(4 * k, halves)
        expected += 1 - (1 - survive) ** (masked_bits * block)
    return expected


def parse_list(text: str, kind=int) -> list:
    try:
        return [kind(item) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"bench_kernel: bad list {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=None, help="elements (default 1 << 27; --dry: 4096)")
    parser.add_argument("--dtypes", default=None, help="default bfloat16,float16,float32 (--dry: bfloat16)")
    parser.add_argument("--halves", default=None, help=f"table halves (default {HALVES})")
    parser.add_argument("--launches", default=None, help=f"BLOCK/WARPS list for the sweep (default {LAUNCHES})")
    parser.add_argument("--sweep-halves", default="16,24")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--out", default="bench_kernel.json")
    parser.add_argument("--dry", action="store_true", help="tiny CPU run (interpret mode): checks the script")
    args = parser.parse_args()
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    run(args)


def run(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import triton.testing

    from jaxflip.kernels_pallas import kernel
    from jaxflip.kernels_pallas.random_bitflip import random_bitflip

    if args.dry:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import mase_reference

        mase_reference.install_cpu_kernels()
    from mase_triton.random_bitflip.functional import random_bitflip_fn

    numel = args.numel or (4096 if args.dry else 1 << 27)
    dtypes = parse_list(args.dtypes or ("bfloat16" if args.dry else "bfloat16,float16,float32"), str)
    halves_list = parse_list(args.halves or ("5" if args.dry else HALVES))
    launch_texts = parse_list(args.launches or ("32/1,256/8" if args.dry else LAUNCHES), str)
    try:
        launches = [kernel.Launch(*parse_list(text.replace("/", ",")), early_exit=True) for text in launch_texts]
    except (TypeError, ValueError) as error:
        raise SystemExit(f"bench_kernel: --launches: {error}") from None
    sweep_halves = parse_list("5" if args.dry else args.sweep_halves)
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bits_dtype = {"float32": jnp.uint32, "float16": jnp.uint16, "bfloat16": jnp.uint16}

    def time_jax(fn, *fn_args) -> float:
        """Median wall ms of ``fn(*fn_args)`` run to completion, after a compile-and-warm-up call."""
        jax.block_until_ready(fn(*fn_args))
        samples = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def time_torch(fn) -> float:
        if device == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
        fn()
        samples = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def flip_fn(launch, halves, threshold, backward: bool):
        """jit of the public op at ``launch``; seeds are arguments (run-time values)."""
        backend = "pallas" if on_gpu else "interpret"

        def forward(x, seed_exp, seed_frac):
            return random_bitflip(x, halves, halves, seed_exp, seed_frac, threshold, backend=backend)[0]

        set_launch(launch)
        if not backward:
            return jax.jit(forward)
        return jax.jit(lambda x, g, s_exp, s_frac: jax.vjp(lambda v: forward(v, s_exp, s_frac), x)[1](g)[0])

    def set_launch(launch) -> None:
        """The launch ``random_bitflip`` uses from now on (read when a function is traced)."""
        os.environ["JAXFLIP_BITFLIP_LAUNCH"] = f"{launch.block}/{launch.num_warps}"
        os.environ["JAXFLIP_BITFLIP_EARLY_EXIT"] = "1" if launch.early_exit else "0"
        kernel.default_launch.cache_clear()

    def variants(launch):
        return [launch, kernel.Launch(launch.block, launch.num_warps, early_exit=False)]

    seeds = (jnp.int32(7), jnp.int32(1007))
    inputs = {dtype: (jax.random.normal(jax.random.key(0), (numel,), jnp.float32).astype(dtype) * 8,
                      jax.random.normal(jax.random.key(1), (numel,), jnp.float32).astype(dtype)) for dtype in dtypes}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"{numel:,} elements; dry={args.dry}", flush=True)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__, numel=numel,
                  threshold=THRESHOLD, dry=args.dry, check=[], sweep=[], rows=[])

    def save():  # after every measurement, so a run cut short still leaves its figures
        Path(args.out).write_text(json.dumps(result, indent=1))

    # 1. correctness at every launch, early exit on and off
    for dtype in dtypes:
        x = inputs[dtype][0][: 1 << 20]
        for halves in (5,) if args.dry else (23,):  # several Philox calls in both groups: exits happen
            want = random_bitflip(x, halves, halves + 1, 11, 12, THRESHOLD, backend="jnp")[0]
            for launch in launches:
                for variant in variants(launch):
                    set_launch(variant)
                    got = jax.jit(lambda v: random_bitflip(v, halves, halves + 1, 11, 12, THRESHOLD,
                                                           backend="pallas" if on_gpu else "interpret")[0])(x)
                    same = bool(jnp.all(jax.lax.bitcast_convert_type(got, bits_dtype[dtype])
                                        == jax.lax.bitcast_convert_type(want, bits_dtype[dtype])))
                    result["check"].append(dict(dtype=dtype, halves=halves, block=variant.block,
                                                num_warps=variant.num_warps, early_exit=variant.early_exit, same=same))
                    if not same:
                        save()
                        raise SystemExit(f"kernel != jnp path: {dtype} halves {halves} {variant}")
    print("kernel == jnp path at every launch, early exit on and off", flush=True)
    save()

    # 2. launch sweep
    sweep_dtype = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    x = inputs[sweep_dtype][0]
    for halves in sweep_halves:
        for launch in launches:
            for variant in variants(launch):
                ms = time_jax(flip_fn(variant, halves, THRESHOLD, backward=False), x, *seeds)
                result["sweep"].append(dict(dtype=sweep_dtype, halves=halves, block=variant.block,
                                            num_warps=variant.num_warps, early_exit=variant.early_exit, ms=ms))
                print(f"sweep {sweep_dtype} halves={halves} block={variant.block} warps={variant.num_warps} "
                      f"early_exit={variant.early_exit}: {ms:.3f} ms", flush=True)
                save()
    totals: dict = {}
    for row in result["sweep"]:
        if row["early_exit"]:
            key = (row["block"], row["num_warps"])
            totals[key] = totals.get(key, 0.0) + row["ms"]
    best = kernel.Launch(*min(totals, key=totals.get), early_exit=True)
    result["table_launch"] = dict(block=best.block, num_warps=best.num_warps)
    print(f"table launch: block={best.block} num_warps={best.num_warps}", flush=True)
    print(HEADER, flush=True)

    # 3. the table
    for dtype in dtypes:
        x, g = inputs[dtype]
        x_torch, g_torch = (torch.from_numpy(np.array(v.astype(jnp.float32))).to(device).to(getattr(torch, dtype))
                            for v in (x, g))
        copy_ms = time_torch(lambda: x_torch.clone())
        for halves in halves_list:
            row = dict(dtype=dtype, halves=halves, block=best.block, num_warps=best.num_warps, copy_ms=copy_ms,
                       philox_calls=2 * -(-halves // 4),
                       expected_calls=sum(expected_philox_calls(halves, bits, best.block) for bits in GROUP_BITS[dtype]))
            for variant, name in zip(variants(best), ("exit", "no_exit")):
                row[f"{name}_fwd_ms"] = time_jax(flip_fn(variant, halves, THRESHOLD, backward=False), x, *seeds)
            row["exit_fwd_bwd_ms"] = time_jax(flip_fn(best, halves, THRESHOLD, backward=True), x, g, *seeds)
            row["mase_fwd_ms"] = time_torch(lambda: random_bitflip_fn(x_torch, halves, halves, 7, 1007, THRESHOLD))
            x_req = x_torch.clone().requires_grad_(True)

            def mase_fwd_bwd():
                y, _, _ = random_bitflip_fn(x_req, halves, halves, 7, 1007, THRESHOLD)
                y.backward(g_torch)
                x_req.grad = None

            row["mase_fwd_bwd_ms"] = time_torch(mase_fwd_bwd)
            result["rows"].append(row)
            print(format_row(row), flush=True)
            save()


HEADER = ("| dtype | halves | Philox calls (expected with exit) | mase fwd | exit fwd | no-exit fwd | "
          "mase/exit fwd | mase/no-exit fwd | mase fwd+bwd | exit fwd+bwd | mase/exit fwd+bwd |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['dtype']} | {r['halves']} | {r['philox_calls']} ({r['expected_calls']:.2f}) | "
            f"{r['mase_fwd_ms']:.3f} | {r['exit_fwd_ms']:.3f} | {r['no_exit_fwd_ms']:.3f} | "
            f"{r['mase_fwd_ms'] / r['exit_fwd_ms']:.2f}x | {r['mase_fwd_ms'] / r['no_exit_fwd_ms']:.2f}x | "
            f"{r['mase_fwd_bwd_ms']:.3f} | {r['exit_fwd_bwd_ms']:.3f} | "
            f"{r['mase_fwd_bwd_ms'] / r['exit_fwd_bwd_ms']:.2f}x |")


if __name__ == "__main__":
    main()
