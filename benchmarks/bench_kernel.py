"""jaxflip's Pallas kernel vs mase-triton's Triton kernel vs a copy, on one GPU.

128M elements (1 << 27) by default, float32 / float16 / bfloat16, both groups at the same
halves, zero-out on and off, forward and forward+backward. Prints one markdown table of
median milliseconds and ratios (mase / jaxflip: above 1 means jaxflip is faster) and writes
it, with the raw numbers, to ``--out``. Also a small block-size / num_warps sweep.

    python benchmarks/bench_kernel.py --out $OUT/bench_kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import torch
import triton.testing
from mase_triton.random_bitflip.functional import random_bitflip_fn

import jaxflip
from jaxflip.kernels_pallas.kernel import bitflip_pallas

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
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench(n: int, dtypes, halves_list) -> list[dict]:
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
    return rows


HEADER = ("| dtype | halves | zero-out | copy | mase fwd | jaxflip fwd | speedup fwd | "
          "mase fwd+bwd | jaxflip fwd+bwd | speedup fwd+bwd | jaxflip fwd / copy |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['dtype']} | {r['halves']} | {'on' if r['zero_out'] else 'off'} | {r['copy_ms']:.3f} | "
            f"{r['mase_fwd_ms']:.3f} | {r['jaxflip_fwd_ms']:.3f} | {r['mase_fwd_ms'] / r['jaxflip_fwd_ms']:.2f}x | "
            f"{r['mase_fwd_bwd_ms']:.3f} | {r['jaxflip_fwd_bwd_ms']:.3f} | "
            f"{r['mase_fwd_bwd_ms'] / r['jaxflip_fwd_bwd_ms']:.2f}x | {r['jaxflip_fwd_ms'] / r['copy_ms']:.1f}x |")


def sweep(n: int) -> list[dict]:
    """Block size and warps of the Pallas kernel, bf16, halves 16 and 24, zero-out on."""
    x_bits = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(jnp.bfloat16)
    scalars = jnp.array([7, 7, 0, 0], jnp.uint32)
    rows = []
    for halves in (16, 24):
        for block in (256, 512, 1024, 2048, 4096):
            for warps in (4, 8):
                ms = time_jax(lambda x, s: bitflip_pallas(
                    x, s, segments=((n, 1),), exp_halves=halves, frac_halves=halves, threshold=THRESHOLD,
                    interpret=False, block=block, num_warps=warps), x_bits, scalars)
                rows.append(dict(halves=halves, block=block, num_warps=warps, ms=ms))
                print(f"sweep bf16 halves={halves} block={block} warps={warps}: {ms:.3f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 27)
    parser.add_argument("--out", default="bench_kernel.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep block size and num_warps")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
          f"{args.numel:,} elements", flush=True)
    sweep_rows = sweep(args.numel) if args.sweep else []
    print(HEADER, flush=True)
    rows = bench(args.numel, list(TORCH_DTYPES), HALVES)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__,
                       numel=args.numel, rows=rows, sweep=sweep_rows), f, indent=1)


if __name__ == "__main__":
    main()
