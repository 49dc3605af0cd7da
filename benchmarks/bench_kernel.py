"""jaxflip's Pallas kernel (per launch and mode) against mase-triton's kernel, one GPU.

128M elements (1 << 27) by default, float32 / float16 / bfloat16, both groups at the same
halves, zero-out threshold 30 (the issue-12/20 tables), seeds passed at run time and unequal
(7 and 1007: compile-time seeds s and s+1 would let the compiler merge the two groups' shared
Philox calls, a fake speedup; equal seeds take the kernel's shared-stream path, timed apart
in the ``equal seeds`` column because training's reference seeds are equal).

1. Check: at every launch, the kernel equals the jnp path (itself tested bit-exact against
   mase-triton) on the first dtype, with unequal and equal seeds, so only correct kernels are
   timed.
2. Launch sweep (bf16, ``--sweep-halves``): every ``--launches`` BLOCK/WARPS/MODE.
3. Table: per dtype and halves, at the shipped launch (``kernel.default_launch``): forward
   (no keep mask, as in eval) and forward+backward median ms of mase and jaxflip, the ratios
   mase / jaxflip (above 1: jaxflip faster), jaxflip's forward with equal seeds, and the
   Philox calls per element of each mode (``expected_philox_calls``).

Median of ``--reps`` ``block_until_ready`` wall times for jaxflip, ``triton.testing.do_bench``
median for mase. Every row goes to ``--out`` as soon as it is measured.

    PYTHONPATH=$PWD python benchmarks/bench_kernel.py --out $OUT/bench_kernel.json        # GPU
    PYTHONPATH=$PWD python benchmarks/bench_kernel.py --dry --out /tmp/bench_kernel.json  # CPU check

``--dry``: 4096 elements, Pallas in interpret mode and mase-triton in the Triton interpreter
(through ``tests/mase_reference.py``), bf16, halves 9, two launches unless given: checks that
the script runs (a few minutes on 2 CPU cores), its timings mean nothing.
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
LAUNCHES = "256/8/dense,512/1/per_element,1024/1/per_element,1024/2/per_element,2048/2/per_element"
HALVES = "1,2,4,6,8,9,10,12,13,14,16,18,20,22,24"
GROUP_BITS = {"float32": (9, 23), "float16": (6, 10), "bfloat16": (9, 7)}  # masked bits: (sign+exp, fraction)
SEEDS = (7, 1007)


def expected_philox_calls(halves: int, masked_bits: int, mode: str) -> float:
    """Expected Philox calls of one group per element. The first always runs; in
    ``per_element`` mode call k + 1 runs unless the first ``min(4 (k + 1), halves)`` words
    cleared every masked bit of the element (each bit surviving a word with probability 1/2;
    the ideal, ignoring that a lane's program waits for its slowest lane); ``dense`` runs
    them all."""
    calls = -(-halves // 4)
    if mode == "dense":
        return float(calls)
    return 1.0 + sum(1 - (1 - 0.5 ** min(4 * k, halves)) ** masked_bits for k in range(1, calls))


def median_ms(fn, *fn_args, reps: int) -> float:
    """Median wall ms of ``fn(*fn_args)`` run to completion, after a compile-and-warm-up call."""
    import jax

    jax.block_until_ready(fn(*fn_args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def parse_list(text: str, kind=int) -> list:
    try:
        return [kind(item) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"bench_kernel: bad list {text!r}") from None


def parse_launch(text: str):
    from jaxflip.kernels_pallas import kernel

    block, warps, mode = (text.split("/") + ["dense"])[:3]
    try:
        return kernel.Launch(int(block), int(warps), mode)
    except ValueError as error:
        raise SystemExit(f"bench_kernel: --launches {text!r}: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=None, help="elements (default 1 << 27; --dry: 4096)")
    parser.add_argument("--dtypes", default=None, help="default bfloat16,float16,float32 (--dry: bfloat16)")
    parser.add_argument("--halves", default=None, help=f"table halves (default {HALVES})")
    parser.add_argument("--launches", default=None, help=f"BLOCK/WARPS/MODE list for the sweep (default {LAUNCHES})")
    parser.add_argument("--sweep-halves", default="4,8,12,16,24", help="'' skips the sweep")
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
    halves_list = parse_list(args.halves or ("9" if args.dry else HALVES))
    launches = [parse_launch(text) for text in
                parse_list(args.launches or ("256/8/dense,256/1/per_element" if args.dry else LAUNCHES), str)]
    sweep_halves = parse_list("9" if args.dry else args.sweep_halves)
    on_gpu = jax.default_backend() == "gpu"
    backend = "pallas" if on_gpu else "interpret"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bits_dtype = {"float32": jnp.uint32, "float16": jnp.uint16, "bfloat16": jnp.uint16}

    def time_jax(fn, *fn_args) -> float:
        return median_ms(fn, *fn_args, reps=args.reps)

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

    def set_launch(launch) -> None:
        """The launch ``random_bitflip`` uses from now on (read when a function is traced);
        None: the shipped default."""
        for name in ("JAXFLIP_BITFLIP_LAUNCH", "JAXFLIP_BITFLIP_MODE"):
            os.environ.pop(name, None)
        if launch is not None:
            os.environ["JAXFLIP_BITFLIP_LAUNCH"] = f"{launch.block}/{launch.num_warps}"
            os.environ["JAXFLIP_BITFLIP_MODE"] = launch.mode
        kernel.default_launch.cache_clear()

    def flip_fn(launch, halves, backward: bool):
        """jit of the public op at ``launch``; seeds are arguments (run-time values)."""

        def forward(x, seed_exp, seed_frac):
            return random_bitflip(x, halves, halves, seed_exp, seed_frac, THRESHOLD, backend=backend)[0]

        set_launch(launch)
        if not backward:
            return jax.jit(forward)
        return jax.jit(lambda x, g, s_exp, s_frac: jax.vjp(lambda v: forward(v, s_exp, s_frac), x)[1](g)[0])

    seeds = tuple(jnp.int32(s) for s in SEEDS)
    equal_seeds = (seeds[0], seeds[0])
    inputs = {dtype: (jax.random.normal(jax.random.key(0), (numel,), jnp.float32).astype(dtype) * 8,
                      jax.random.normal(jax.random.key(1), (numel,), jnp.float32).astype(dtype)) for dtype in dtypes}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"{numel:,} elements; dry={args.dry}", flush=True)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__, numel=numel,
                  threshold=THRESHOLD, seeds=SEEDS, dry=args.dry, check=[], sweep=[], rows=[])

    def save():  # after every measurement, so a run cut short still leaves its figures
        Path(args.out).write_text(json.dumps(result, indent=1))

    # 1. correctness at every launch, unequal and equal seeds, several calls in both groups
    for dtype in dtypes[:1]:  # the other dtypes at every launch: tests/kernels_pallas (pytest -m gpu)
        x = inputs[dtype][0][: (1 << 20) + 3]
        for exp_halves, frac_halves, seed_frac in ((23, 9, 12), (14, 14, 11)):
            want = random_bitflip(x, exp_halves, frac_halves, 11, seed_frac, THRESHOLD, backend="jnp")[0]
            for launch in launches:
                set_launch(launch)
                got = jax.jit(lambda v: random_bitflip(v, exp_halves, frac_halves, 11, seed_frac, THRESHOLD,
                                                       backend=backend)[0])(x)
                same = bool(jnp.all(jax.lax.bitcast_convert_type(got, bits_dtype[dtype])
                                    == jax.lax.bitcast_convert_type(want, bits_dtype[dtype])))
                result["check"].append(dict(dtype=dtype, halves=[exp_halves, frac_halves], equal_seeds=seed_frac == 11,
                                            launch=launch_text(launch), same=same))
                if not same:
                    save()
                    raise SystemExit(f"kernel != jnp path: {dtype} halves {exp_halves}/{frac_halves} {launch}")
    print("kernel == jnp path at every launch, unequal and equal seeds", flush=True)
    save()

    # 2. launch sweep
    sweep_dtype = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    x = inputs[sweep_dtype][0]
    for halves in sweep_halves:
        for launch in launches:
            ms = time_jax(flip_fn(launch, halves, backward=False), x, *seeds)
            result["sweep"].append(dict(dtype=sweep_dtype, halves=halves, launch=launch_text(launch), ms=ms))
            print(f"sweep {sweep_dtype} halves={halves} {launch_text(launch)}: {ms:.3f} ms", flush=True)
            save()

    # 3. the table, at the shipped launch
    print(HEADER, flush=True)
    for dtype in dtypes:
        x, g = inputs[dtype]
        x_torch, g_torch = (torch.from_numpy(np.array(v.astype(jnp.float32))).to(device).to(getattr(torch, dtype))
                            for v in (x, g))
        copy_ms = time_torch(lambda: x_torch.clone())
        for halves in halves_list:
            set_launch(None)
            launch = kernel.default_launch(not on_gpu)
            row = dict(dtype=dtype, halves=halves, launch=launch_text(launch), copy_ms=copy_ms,
                       calls={mode: sum(expected_philox_calls(halves, bits, mode) for bits in GROUP_BITS[dtype])
                              for mode in kernel.MODES})
            row["fwd_ms"] = time_jax(flip_fn(None, halves, backward=False), x, *seeds)
            row["fwd_equal_seeds_ms"] = time_jax(flip_fn(None, halves, backward=False), x, *equal_seeds)
            row["fwd_bwd_ms"] = time_jax(flip_fn(None, halves, backward=True), x, g, *seeds)
            row["mase_fwd_ms"] = time_torch(lambda: random_bitflip_fn(x_torch, halves, halves, *SEEDS, THRESHOLD))
            x_req = x_torch.clone().requires_grad_(True)

            def mase_fwd_bwd():
                y, _, _ = random_bitflip_fn(x_req, halves, halves, *SEEDS, THRESHOLD)
                y.backward(g_torch)
                x_req.grad = None

            row["mase_fwd_bwd_ms"] = time_torch(mase_fwd_bwd)
            result["rows"].append(row)
            print(format_row(row), flush=True)
            save()


def launch_text(launch) -> str:
    return f"{launch.block}/{launch.num_warps}/{launch.mode}"


HEADER = ("| dtype | halves | launch | Philox calls per element: dense / per element (ideal) | "
          "mase fwd | jaxflip fwd | mase/jaxflip fwd | jaxflip fwd, equal seeds | mase fwd+bwd | jaxflip fwd+bwd | "
          "mase/jaxflip fwd+bwd |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    calls = " / ".join(f"{r['calls'][mode]:.2f}" for mode in ("dense", "per_element"))
    return (f"| {r['dtype']} | {r['halves']} | {r['launch']} | {calls} | {r['mase_fwd_ms']:.3f} | {r['fwd_ms']:.3f} | "
            f"{r['mase_fwd_ms'] / r['fwd_ms']:.2f}x | {r['fwd_equal_seeds_ms']:.3f} | {r['mase_fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['mase_fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x |")


if __name__ == "__main__":
    main()
