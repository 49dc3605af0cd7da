"""jaxflip's Pallas kernel vs mase-triton's Triton kernel vs a copy, on one GPU.

128M elements (1 << 27) by default, float32 / float16 / bfloat16, both groups at the same
halves, zero-out on and off, forward and forward+backward. Prints one markdown table of
median milliseconds and ratios (mase / jaxflip: above 1 means jaxflip is faster) and writes
it, with the raw numbers, to ``--out``. First (``--sweep``) a sweep of the kernel's block size and num_warps;
the table then uses the fastest block and warps.

    python benchmarks/bench_kernel.py --out $OUT/bench_kernel.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
import torch
from jax import lax
import triton.testing
from mase_triton.random_bitflip.functional import random_bitflip_fn

import jaxflip
from jaxflip.kernels_pallas import kernel

bitflip_module = importlib.import_module("jaxflip.kernels_pallas.random_bitflip")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALVES = (1, 4, 8, 12, 16, 20, 24)
THRESHOLD = 30.0


def time_jax(fn, *args, reps: int = 25) -> float:
    """Median wall ms of ``fn(*args)`` run to completion (after a compile-and-warm-up call)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_torch(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench(n: int, dtypes, halves_list, on_row) -> list[dict]:
    rows = []
    for dtype in dtypes:
        x_jax = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(dtype)
        g_jax = jax.random.normal(jax.random.key(1), (n,), jnp.float32).astype(dtype)
        x_torch = torch.randn(n, device="cuda", dtype=TORCH_DTYPES[dtype])
        g_torch = torch.randn(n, device="cuda", dtype=TORCH_DTYPES[dtype])
        copy_ms = time_torch(lambda: x_torch.clone())
        for halves in halves_list:
            for threshold in (None, THRESHOLD):
                fwd = jax.jit(lambda x, s: jaxflip.random_bitflip(x, halves, halves, s, s, threshold)[0])
                fwd_bwd = jax.jit(lambda x, g, s: jax.vjp(
                    lambda v: jaxflip.random_bitflip(v, halves, halves, s, s, threshold)[0], x)[1](g)[0])
                seed = jnp.int32(7)
                jax_fwd = time_jax(fwd, x_jax, seed)
                jax_fb = time_jax(fwd_bwd, x_jax, g_jax, seed)

                mase_fwd = time_torch(lambda: random_bitflip_fn(x_torch, halves, halves, 7, 7, threshold))
                x_req = x_torch.clone().requires_grad_(True)

                def mase_fb():
                    y, _, _ = random_bitflip_fn(x_req, halves, halves, 7, 7, threshold)
                    y.backward(g_torch)
                    x_req.grad = None

                mase_fb_ms = time_torch(mase_fb)
                row = dict(dtype=dtype, halves=halves, zero_out=threshold is not None, copy_ms=copy_ms,
                           jaxflip_fwd_ms=jax_fwd, mase_fwd_ms=mase_fwd,
                           jaxflip_fwd_bwd_ms=jax_fb, mase_fwd_bwd_ms=mase_fb_ms)
                rows.append(row)
                print(format_row(row), flush=True)
                on_row(rows)
    return rows


HEADER = ("| dtype | halves | zero-out | copy | mase fwd | jaxflip fwd | speedup fwd | "
          "mase fwd+bwd | jaxflip fwd+bwd | speedup fwd+bwd | jaxflip fwd / copy |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['dtype']} | {r['halves']} | {'on' if r['zero_out'] else 'off'} | {r['copy_ms']:.3f} | "
            f"{r['mase_fwd_ms']:.3f} | {r['jaxflip_fwd_ms']:.3f} | {r['mase_fwd_ms'] / r['jaxflip_fwd_ms']:.2f}x | "
            f"{r['mase_fwd_bwd_ms']:.3f} | {r['jaxflip_fwd_bwd_ms']:.3f} | "
            f"{r['mase_fwd_bwd_ms'] / r['jaxflip_fwd_bwd_ms']:.2f}x | {r['jaxflip_fwd_ms'] / r['copy_ms']:.1f}x |")


SWEEP = [(64, 2), (128, 2), (128, 4), (256, 4), (256, 8), (512, 8), (512, 16), (1024, 4), (1024, 8)]


def sweep(n: int) -> list[dict]:
    """Block size and warps of the Pallas kernel; bf16, halves 16 and 24, zero-out on."""
    x_bits = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(jnp.bfloat16)
    scalars = jnp.array([7, 7, 0, 0], jnp.uint32)
    rows = []
    for block, warps in SWEEP:
        for halves in (16, 24):
            ms = time_jax(lambda x, s: kernel.bitflip_pallas(
                x, s, segments=((n, 1),), exp_halves=halves, frac_halves=halves, threshold=THRESHOLD,
                interpret=False, block=block, num_warps=warps), x_bits, scalars)
            rows.append(dict(halves=halves, block=block, num_warps=warps, ms=ms))
            print(f"sweep bf16 halves={halves} block={block} warps={warps}: {ms:.3f} ms", flush=True)
    return rows


def best_launch(sweep_rows: list[dict]) -> tuple[int, int]:
    """(block, num_warps) with the least total time over the halves."""
    totals: dict[tuple[int, int], float] = {}
    for r in sweep_rows:
        totals[r["block"], r["num_warps"]] = totals.get((r["block"], r["num_warps"]), 0.0) + r["ms"]
    return min(totals, key=totals.get)


def check_against_jnp(n: int = 1 << 20) -> None:
    """Before timing: the Pallas kernel equals the jnp path (itself tested bit-exact against
    mase-triton) on every dtype at a few halves, so the table times a correct kernel."""
    for dtype in TORCH_DTYPES:
        x = jax.random.normal(jax.random.key(3), (n,), jnp.float32).astype(dtype) * 8
        for halves in (4, 7, 23):
            for threshold in (None, THRESHOLD):
                got, want = (jaxflip.random_bitflip(x, halves, halves + 1, 11, 12, threshold, backend=b)[0]
                             for b in ("pallas", "jnp"))
                same = bool(jnp.all(lax.bitcast_convert_type(got, jnp.uint16 if dtype != "float32" else jnp.uint32)
                                    == lax.bitcast_convert_type(want, jnp.uint16 if dtype != "float32" else jnp.uint32)))
                if not same:
                    raise SystemExit(f"pallas != jnp for {dtype} halves {halves} threshold {threshold}")
    print("pallas kernel == jnp path on all checked configurations", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 27)
    parser.add_argument("--out", default="bench_kernel.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep block size and num_warps")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"{args.numel:,} elements", flush=True)
    check_against_jnp()
    sweep_rows = sweep(args.numel) if args.sweep else []
    block, warps = best_launch(sweep_rows) if sweep_rows else (kernel.DEFAULT_BLOCK, kernel.DEFAULT_NUM_WARPS)
    # the table runs random_bitflip itself, launched with the chosen block and warps
    bitflip_module.bitflip_pallas = functools.partial(kernel.bitflip_pallas, block=block, num_warps=warps)
    print(f"table launch: block={block} num_warps={warps}", flush=True)
    print(HEADER, flush=True)

    def save(rows):  # after every row, so a run cut short still leaves its figures
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__,
                           numel=args.numel, block=block, num_warps=warps, rows=rows, sweep=sweep_rows),
                      f, indent=1)

    bench(args.numel, list(TORCH_DTYPES), HALVES, save)


if __name__ == "__main__":
    main()
