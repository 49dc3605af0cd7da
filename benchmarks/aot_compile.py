"""Ahead-of-time compile of a config's training step, with no weights in memory.

    python benchmarks/aot_compile.py --config configs/llama3-70b-lora.toml --model.hf_model_path ""

Builds the model abstractly (``nnx.eval_shape``: LoRA, bitflip rules, remat, scanned layers
as training sets them up), lowers the step for every visible device with the config's
micro-batch and compiles it, printing the lowering and compile seconds and the compiled
program's memory analysis per device (arguments, outputs, temporaries). Nothing is allocated
on the devices, so a 70B step compiles on any host with the right device kind.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxflip.models.scan import stack_layers
from jaxflip.train import setup
from jaxflip.train.train_config import load_config
from jaxflip.train.step import (abstract_train_state, batch_sharding, make_optimizer, make_train_step, split_model,
                                state_sharding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()
    config = load_config(args.config, overrides)
    mesh = setup.build_mesh(config)
    start = time.perf_counter()
    model = setup.abstract_model(config, mesh)
    scanned = stack_layers(model)
    graphdef, trainable, frozen, seeds = split_model(model, config.lora.r > 0)
    tx = make_optimizer(config.training)
    abstract = abstract_train_state(tx, trainable, frozen, seeds)
    shardings = state_sharding(mesh, tx, abstract)
    t = config.training
    batch = jax.ShapeDtypeStruct((t.gradient_accumulation_steps, t.local_batch_size * jax.device_count(),
                                  t.seq_len + 1), jnp.int32)
    step = make_train_step(graphdef, tx, t, shardings, batch_sharding(mesh))
    built = time.perf_counter()
    lowered = step.lower(abstract, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    gib = {name: getattr(memory, f"{name}_size_in_bytes") / 2**30
           for name in ("argument", "output", "temp", "generated_code")} if memory is not None else None
    print(json.dumps({"flavor": config.flavor, "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
                      "scanned_layers": scanned, "bitflip": config.bitflip.enable, "build_s": built - start,
                      "lower_s": lowered_at - built, "compile_s": compiled_at - lowered_at,
                      "memory_gib_per_device": gib}, indent=1))


if __name__ == "__main__":
    main()
