"""Validation loss during training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflip.train import setup
from jaxflip.train.step import batch_sharding, init_state, make_eval_step, make_optimizer, make_train_step

# weights flipped in every bit group, activations in the exponent only: the train step's and the
# eval step's float32 activations may differ by an ulp, which fraction flips would amplify
WEIGHT_FLIPS = {r"model\.layers\.0\.mlp\.down_proj": dict(
    x_p_exp=0.5**10, x_zero_out_t=30.0, w_p_exp=0.5**8, w_p_frac=0.5**6, w_zero_out_t=1.25)}


def test_validation_is_the_training_forward_and_leaves_training_as_it_was(tiny_job):
    """Before each step, the eval step on that step's batch gives the loss the step reports
    (the same forward, from the same seeds); and steps with evaluations between them train
    exactly as steps without."""
    config = tiny_job(training={"gradient_accumulation_steps": 1}, bitflip={"rules": WEIGHT_FLIPS})
    mesh = setup.build_mesh(config)
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, _ = init_state(model, tx, mesh, lora=False)
    batch_shard = batch_sharding(mesh)
    train_step = make_train_step(graphdef, tx, config.training, shardings, batch_shard)
    evaluate = make_eval_step(graphdef, config.training, shardings, batch_shard)
    rows = np.random.default_rng().integers(0, 4096, (3, 1, jax.device_count(), 33), dtype=np.int32)
    batches = [jax.device_put(batch, batch_shard) for batch in rows]

    alone = jax.tree.map(jnp.copy, state)
    validated, reported, losses_alone = [], [], []
    for batch in batches:
        validated.append(float(evaluate(state, batch)))
        state, metrics = train_step(state, batch)
        reported.append(float(metrics["loss"]))
        alone, metrics = train_step(alone, batch)
        losses_alone.append(float(metrics["loss"]))
    assert validated == pytest.approx(reported, rel=1e-5)
    assert reported == losses_alone
    assert jax.tree.all(jax.tree.map(np.array_equal, state.seeds, alone.seeds))


def test_a_run_with_validation_records_a_finite_loss_at_each_interval_and_at_the_end(tiny_job):
    import json
    from pathlib import Path

    from jaxflip.train.loop import run

    steps = int(np.random.default_rng().integers(3, 6))
    config = tiny_job(training={"steps": steps, "save_freq": 100}, validation={"eval_interval": 2, "eval_steps": 1},
                      checkpoint={"enable": False, "export_model": False})
    summary = run(config)
    lines = (Path(config.job.output_dir) / "metrics.jsonl").read_text().splitlines()
    validation = [record for record in map(json.loads, lines) if "val_loss" in record]
    assert [record["step"] for record in validation] == sorted({*range(2, steps + 1, 2), steps})
    assert all(np.isfinite(record["val_loss"]) and record["val_loss"] > 0 for record in validation)
    assert summary["finished"]


def test_two_validation_rounds_compile_the_eval_step_once(tiny_job):
    """Each round sees the state a training step returned (committed, with the step's
    declared shardings): one program for both."""
    from jaxflip.compile_count import CompileCount
    from jaxflip.train.loop import run

    config = tiny_job(training={"steps": 4, "save_freq": 100}, validation={"eval_interval": 2, "eval_steps": 1},
                      checkpoint={"enable": False, "export_model": False})
    with CompileCount() as compiles:
        run(config)
    assert compiles.of("evaluate") == 1, compiles
