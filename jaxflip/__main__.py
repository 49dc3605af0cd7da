"""``python -m jaxflip``: flip a random tensor and report measured flip rates per bit group.

The small built-in main job until the training CLI lands. Example:
``python -m jaxflip --numel 4194304 --dtype bfloat16 --exp-halves 4 --frac-halves 6``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxflip
from jaxflip.kernels_pallas.philox import BITS_DTYPE, FRAC_MASK, SIGN_EXP_MASK


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxflip", description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    parser.add_argument("--exp-halves", type=int, default=4)
    parser.add_argument("--frac-halves", type=int, default=6)
    parser.add_argument("--zero-out", type=float, default=None, help="zero-out threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(args.seed), (args.numel,), jnp.float32).astype(args.dtype)
    start = time.perf_counter()
    y, seed_exp, seed_frac = jaxflip.random_bitflip(
        x, args.exp_halves, args.frac_halves, args.seed, args.seed)
    y.block_until_ready()
    seconds = time.perf_counter() - start
    bits_dtype = BITS_DTYPE[args.dtype]
    flipped = np.asarray(jax.lax.bitcast_convert_type(x, bits_dtype) ^ jax.lax.bitcast_convert_type(y, bits_dtype))
    print(f"{args.numel:,} {args.dtype} elements on {jax.default_backend()} in {seconds * 1e3:.1f} ms "
          f"(first call, compile included); next seeds exp={seed_exp} frac={seed_frac}")
    print(f"{'group':<10}{'halves':>7}{'expected p':>14}{'measured p':>14}")
    for name, halves, mask in (("sign+exp", args.exp_halves, SIGN_EXP_MASK[args.dtype]),
                               ("fraction", args.frac_halves, FRAC_MASK[args.dtype])):
        width = bin(mask).count("1")
        measured = np.count_nonzero(np.unpackbits((flipped & mask).view(np.uint8))) / (args.numel * width)
        print(f"{name:<10}{halves:>7}{jaxflip.calculate_flip_probability(halves):>14.3e}{measured:>14.3e}")
    if args.zero_out is not None:
        zeroed, *_ = jaxflip.random_bitflip(x, args.exp_halves, args.frac_halves, args.seed, args.seed, args.zero_out)
        dropped = int(jnp.sum((zeroed == 0) & (y != 0)))
        print(f"zero-out at {args.zero_out}: {dropped:,} flipped elements set to 0 (|y| >= threshold, NaN, inf)")


if __name__ == "__main__":
    main()
