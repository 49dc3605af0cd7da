"""The FSDP-sharded step computes what the single-device step computes; the scanned decoder
stack trains as the Python loop does."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxflip.bitflip import BitflipSeed, LoRAParam
from jaxflip.models.scan import unstack_layers
from jaxflip.models.sharding import make_mesh
from jaxflip.train import setup
from jaxflip.train.step import batch_sharding, init_state, make_optimizer, make_train_step, merge_model

FLIP = dict(x_p_exp=0.5**10, x_p_frac=0.5**6, x_zero_out_t=30.0, w_p_exp=0.5**10, w_p_frac=0.5**6, w_zero_out_t=1.25)
# the same flips in every layer: the layers stay identical, so the step scans them
EVERY_DOWN_PROJ = {r"model\.layers\.\d+\.mlp\.down_proj": FLIP}


def train(config, mesh, batches, *, scan_layers=True):
    """``(losses, grad_norms, scanned, trained model in the public layout)``."""
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, scanned = init_state(model, tx, mesh, lora=config.lora.r > 0,
                                                     scan_layers=scan_layers)
    step = make_train_step(graphdef, tx, config.training, shardings, batch_sharding(mesh))
    losses, grad_norms = [], []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    model = merge_model(graphdef, state.trainable, state.frozen, state.seeds)
    unstack_layers(model)
    return losses, grad_norms, scanned, model


def flat_values(model, variable_type) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, variable_type))}


def random_batches(count):
    rng = np.random.default_rng()
    return [rng.integers(0, 4096, (2, 8, 33), dtype=np.int32) for _ in range(count)]


@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp_step_equals_single_device_step(tiny_job, lora):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    # Adam divides by sqrt(v) + eps: with jax's 1e-8, an entry whose gradient is ~0 moves by
    # ~lr in a direction its rounding noise picks; eps 1e-3 keeps updates proportional to gradients
    config = tiny_job(lora={"r": lora, "lora_alpha": 8.0}, training={"eps": 1e-3})
    batches = random_batches(2)
    single_losses, _, _, single = train(config, make_mesh(1, 1, devices=jax.devices()[:1]), batches)
    sharded_losses, _, _, sharded = train(config, make_mesh(2, 4), batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    assert single_losses[1] != single_losses[0]
    trained = LoRAParam if lora else nnx.Param
    for a, b in zip(flat_values(sharded, trained).values(), flat_values(single, trained).values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # steps are ~1e-3; rounding seen up to 4e-6
    assert flat_values(sharded, BitflipSeed).keys() == flat_values(single, BitflipSeed).keys()
    assert all(np.array_equal(a, b) for a, b in zip(flat_values(sharded, BitflipSeed).values(),
                                                    flat_values(single, BitflipSeed).values()))


@pytest.mark.parametrize("lora", [0, 4])
def test_scanned_layers_train_as_the_loop_does(tiny_job, lora):
    """FSDP over 8 devices, flips in every layer, gradient accumulation, 3 steps."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 host devices)")
    config = tiny_job(lora={"r": lora, "lora_alpha": 8.0}, training={"eps": 1e-3},
                      bitflip={"rules": EVERY_DOWN_PROJ})
    mesh, batches = make_mesh(2, 4), random_batches(3)
    losses, grad_norms, loop_scanned, unrolled = train(config, mesh, batches, scan_layers=False)
    scanned_losses, scanned_grad_norms, scanned, trained = train(config, mesh, batches)
    assert scanned and not loop_scanned
    np.testing.assert_allclose(scanned_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(scanned_grad_norms, grad_norms, rtol=1e-4)
    assert losses[2] != losses[0]
    fresh = train(config, mesh, [], scan_layers=False)[3]
    initial, params, unrolled_params = (flat_values(model, nnx.Param) for model in (fresh, trained, unrolled))
    assert params.keys() == unrolled_params.keys()
    for path, value in unrolled_params.items():
        # the updates agree up to float32 rounding of another fusion order, measured over the
        # whole tensor: Adam can turn the rounding of a near-zero gradient into an update of
        # either sign for a single element (seen once: 1 of 524,288); weights that do not
        # train stay bit-identical
        update, unrolled_update = params[path] - initial[path], value - initial[path]
        assert np.linalg.norm(update - unrolled_update) <= 1e-2 * np.linalg.norm(unrolled_update), path
    seeds, unrolled_seeds = flat_values(trained, BitflipSeed), flat_values(unrolled, BitflipSeed)
    assert seeds.keys() == unrolled_seeds.keys()
    assert all(np.array_equal(seeds[path], unrolled_seeds[path]) for path in seeds)
    fresh_seeds = flat_values(fresh, BitflipSeed)
    advanced = [path for path in seeds if not np.array_equal(seeds[path], fresh_seeds[path])]
    assert {path[2] for path in advanced} == {0, 1}, "every layer's down_proj should flip"
