"""The FSDP-sharded step computes what the single-device step computes."""

import jax
import numpy as np
import pytest

from jaxflip.models.sharding import make_mesh
from jaxflip.train import setup
from jaxflip.train.step import batch_sharding, init_state, make_optimizer, make_train_step


def two_steps(config, mesh, batches):
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, _ = init_state(model, tx, mesh, lora=config.lora.r > 0)
    step = make_train_step(graphdef, tx, config.training, shardings, batch_sharding(mesh))
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp_step_equals_single_device_step(tiny_job, lora):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    # Adam divides by sqrt(v) + eps: with jax's 1e-8, an entry whose gradient is ~0 moves by
    # ~lr in a direction its rounding noise picks; eps 1e-3 keeps updates proportional to gradients
    config = tiny_job(lora={"r": lora, "lora_alpha": 8.0}, training={"eps": 1e-3})
    rng = np.random.default_rng()
    batches = [rng.integers(0, 4096, (2, 8, 33), dtype=np.int32) for _ in range(2)]
    single_losses, single = two_steps(config, make_mesh(1, 1, devices=jax.devices()[:1]), batches)
    sharded_losses, sharded = two_steps(config, make_mesh(2, 4), batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    assert single_losses[1] != single_losses[0]
    for a, b in zip(jax.tree.leaves(sharded.trainable), jax.tree.leaves(single.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)  # steps are ~1e-3
    assert jax.tree.leaves(sharded.seeds) == jax.tree.leaves(single.seeds)
