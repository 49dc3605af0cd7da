"""Sampled flips (``exact=False``) against exact ones and a copy of the tensor, forward only,
in one process: the ratios the issue's bars are stated in.

    python benchmarks/bench_sampled.py --log2-elements 27 --dtype bfloat16 --halves 16   # a GPU
    python benchmarks/bench_sampled.py --log2-elements 22 --dtype float32 --halves 16    # a CPU

The seeds are run-time arguments (a compile-time seed lets XLA fold and merge the draws, a
fake speed-up) and advance between calls, as in a model.
"""

from __future__ import annotations

import argparse
import json

from bench_kernel import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-elements", type=int, default=22)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--halves", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxflip.kernels_pallas.limits import flip_setting
    from jaxflip.kernels_pallas.random_bitflip import flip_with_setting

    x = jax.random.normal(jax.random.key(0), (2**args.log2_elements,), jnp.float32).astype(args.dtype)
    setting = jnp.asarray(flip_setting(args.halves, args.halves, None))
    seeds = (jnp.int32(11), jnp.int32(29))

    def flipper(exact: bool):
        @jax.jit
        def flip(x, seed_exp, seed_frac):
            return flip_with_setting(x, setting, seed_exp, seed_frac, zero_out=False, exact=exact)[0]
        return flip

    copy = jax.jit(lambda x: x + jnp.zeros((), x.dtype))  # one read and one write, as a clone
    timings = {"copy_ms": median_ms(copy, x, reps=args.reps),
               "sampled_ms": median_ms(flipper(False), x, *seeds, reps=args.reps),
               "exact_ms": median_ms(flipper(True), x, *seeds, reps=args.reps)}
    print(json.dumps({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                      "elements": x.size, "dtype": args.dtype, "halves": args.halves, **timings,
                      "sampled_over_copy": timings["sampled_ms"] / timings["copy_ms"],
                      "exact_over_sampled": timings["exact_ms"] / timings["sampled_ms"]}))


if __name__ == "__main__":
    main()
