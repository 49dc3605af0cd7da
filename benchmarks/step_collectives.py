"""Collectives of one compiled training step, in multiples of the f32 parameter bytes.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAXFLIP_BITFLIP_BACKEND=interpret \
        python benchmarks/step_collectives.py --config configs/quickstart.toml [--bitflip.enable false]

Compiles (does not run) the step of the config on every visible device and prints the bytes
each kind of collective produces per device. An FSDP step needs ~3x (gather the weights for
the forward and the backward, reduce-scatter the gradients).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from jaxflip.train import setup
from jaxflip.train.collectives import collective_bytes
from jaxflip.train.train_config import load_config
from jaxflip.train.step import batch_sharding, init_state, make_optimizer, make_train_step


def step_collectives(config) -> dict:
    mesh = setup.build_mesh(config)
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, _ = init_state(model, tx, mesh, config.lora.r > 0)
    t = config.training
    batch = jax.ShapeDtypeStruct((t.gradient_accumulation_steps, t.local_batch_size * jax.device_count(),
                                  t.seq_len + 1), np.int32, sharding=batch_sharding(mesh))
    step = make_train_step(graphdef, tx, t, shardings, batch_sharding(mesh))
    start = time.perf_counter()
    hlo = step.lower(state, batch).compile().as_text()
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
    moved = collective_bytes(hlo)
    return {"devices": jax.device_count(), "param_bytes_f32": param_bytes, "compile_s": time.perf_counter() - start,
            "collectives": dict(moved), "ratio": sum(moved.values()) / param_bytes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    print(json.dumps(step_collectives(load_config(args.config, overrides)), indent=1))


if __name__ == "__main__":
    sys.exit(main())
