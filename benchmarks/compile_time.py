"""Compile time of model creation and of the first training step, by layer count (issue 11).

    python benchmarks/compile_time.py --flavor aixsim-60M --layers 2 8 22 --seq-len 64

For each layer count it prints, in seconds:

* ``create whole``: compiling the whole random initialization as one program
  (``create_sharded``, what training did before), compile only;
* ``create by layer``: ``create_random_llama`` from start to a ready model (its compiles of
  one decoder layer, the embedding, norm and head, plus running them), which is what training
  does now;
* ``step loop`` / ``step scan``: compiling one train step (forward, backward, AdamW) with the
  decoder layers as a Python loop / scanned.

No persistent compilation cache is used (every figure is a cold compile). Runs on whatever
backend jax picks (CPU or one GPU); the mesh is one device.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from jaxflip.bitflip import apply_bitflip_rules
from jaxflip.models import LlamaForCausalLM, get_flavor
from jaxflip.models.create import create_random_llama
from jaxflip.models.sharding import make_mesh, state_shardings
from jaxflip.train.train_config import from_dict
from jaxflip.train.step import batch_sharding, init_state, make_optimizer, make_train_step

# NewComputeBench's default-rule shape: the same flips in every decoder Linear
EVERY_LINEAR = {"default": dict(x_p_exp=0.5**16, x_p_frac=0.5**16, x_zero_out_t=30.0,
                                w_p_exp=0.5**16, w_p_frac=0.5**16, w_zero_out_t=1.25)}


def seconds(f) -> tuple[float, object]:
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def create_whole_compile(config, mesh, seed: int) -> float:
    abstract_state = nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(seed))))
    create = jax.jit(lambda: nnx.state(LlamaForCausalLM(config, rngs=nnx.Rngs(seed))),
                     out_shardings=state_shardings(abstract_state, mesh))
    lowered = create.lower()
    return seconds(lowered.compile)[0]


def step_compile(config, mesh, training, bitflip: bool, remat: str, scan_layers: bool, seq_len: int,
                 batch: int) -> float:
    model = create_random_llama(config, mesh, seed=0)
    model.model.set_remat(remat)
    if bitflip:
        apply_bitflip_rules(model, EVERY_LINEAR)
    tx = make_optimizer(training)
    graphdef, state, shardings, scanned = init_state(model, tx, mesh, lora=False, scan_layers=scan_layers)
    assert scanned == scan_layers
    step = make_train_step(graphdef, tx, training, shardings, batch_sharding(mesh))
    tokens = jax.device_put(np.zeros((training.gradient_accumulation_steps, batch, seq_len + 1), np.int32),
                            batch_sharding(mesh))
    lowered = step.lower(state, tokens)
    return seconds(lowered.compile)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="aixsim-60M")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 22], help="num_hidden_layers to try")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bitflip", action="store_true", help="flips in every decoder Linear")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--skip-loop-above", type=int, default=None,
                        help="skip the loop's step compile for more layers than this (slow with --bitflip)")
    args = parser.parse_args()

    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    training = from_dict({"model": {"flavor": args.flavor},
                          "training": {"seq_len": args.seq_len, "gradient_accumulation_steps": 1}}).training
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); flavor {args.flavor}, "
          f"seq_len {args.seq_len}, batch {args.batch}, bitflip {'every Linear' if args.bitflip else 'off'}, "
          f"remat {args.remat}", flush=True)
    print(f"{'layers':>6} {'create whole':>13} {'create by layer':>16} {'step loop':>10} {'step scan':>10}", flush=True)
    for layers in args.layers:
        config = get_flavor(args.flavor, num_hidden_layers=layers)
        whole = create_whole_compile(config, mesh, seed=0)
        by_layer, _ = seconds(lambda: jax.block_until_ready(nnx.state(create_random_llama(config, mesh, seed=0))))
        skip_loop = args.skip_loop_above is not None and layers > args.skip_loop_above
        compile_step = lambda scan_layers: step_compile(config, mesh, training, args.bitflip, args.remat,  # noqa: E731
                                                        scan_layers, args.seq_len, args.batch)
        loop = None if skip_loop else compile_step(False)
        scan = compile_step(True)
        loop_text = "skipped" if loop is None else f"{loop:.1f}"
        print(f"{layers:>6} {whole:>13.1f} {by_layer:>16.1f} {loop_text:>10} {scan:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
