"""FSDP on host devices, through the Pallas kernel (interpret mode) as on GPU: the compiled
step moves only what FSDP must (weights gathered, gradients reduced; no gathered activations,
no gathered flips), and N devices give the one-device losses."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxflip.models.sharding import make_mesh
from jaxflip.train import setup
from jaxflip.train.collectives import collective_bytes
from jaxflip.train.step import batch_sharding, init_state, make_optimizer, make_train_step

# an FSDP step gathers every weight for the forward and again for the backward, and reduces
# the gradients: ~3x the f32 parameter bytes; XLA guessing activation layouts costs far more
FSDP_BUDGET = 4.0


@pytest.fixture(autouse=True)
def pallas_interpret(monkeypatch):
    """The GPU path (a Pallas custom call XLA cannot partition), run on the CPU."""
    monkeypatch.setenv("JAXFLIP_BITFLIP_BACKEND", "interpret")


def compiled_step(config, mesh):
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, _ = init_state(model, tx, mesh, lora=config.lora.r > 0)
    return make_train_step(graphdef, tx, config.training, shardings, batch_sharding(mesh)), state


def global_batch(config, rows: int, rng) -> np.ndarray:
    t = config.training
    return rng.integers(0, 4096, (t.gradient_accumulation_steps, rows, t.seq_len + 1), dtype=np.int32)


def mesh_of(dp: int, fsdp: int):
    if jax.device_count() < dp * fsdp:
        pytest.skip(f"needs {dp * fsdp} devices (tests/conftest.py forces 8 host devices)")
    return make_mesh(dp=dp, fsdp=fsdp, devices=jax.devices()[: dp * fsdp])


# clean only with the slow tests: the bitflip step moves the same parameters, its flips on the shards
@pytest.mark.parametrize("bitflip", [pytest.param(False, marks=pytest.mark.slow), True], ids=["clean", "bitflip"])
def test_fsdp_step_moves_about_three_times_the_parameters(tiny_job, bitflip):
    """The quickstart's step shape (8 x 64 tokens per device, 4096-token vocabulary), one
    flipped Linear (each flipped tensor costs seconds of interpret-mode compile)."""
    config = tiny_job(bitflip={"enable": bitflip},
                      training={"gradient_accumulation_steps": 1, "local_batch_size": 8, "seq_len": 64})
    mesh = mesh_of(1, 4)
    step, state = compiled_step(config, mesh)
    rows = 4 * config.training.local_batch_size
    batch = jax.ShapeDtypeStruct((1, rows, config.training.seq_len + 1), np.int32, sharding=batch_sharding(mesh))
    moved = collective_bytes(step.lower(state, batch).compile().as_text())
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
    assert moved["all-gather"] > 0, "FSDP must gather the sharded weights"
    assert sum(moved.values()) <= FSDP_BUDGET * param_bytes, dict(moved)


# (1, 4) is slow-only: (2, 2) already splits the batch and the weights, in half the CI time
@pytest.mark.parametrize("dp, fsdp", [pytest.param(1, 4, marks=pytest.mark.slow), (2, 2)])
def test_sharded_steps_give_the_one_device_losses(tiny_job, dp, fsdp):
    """Same global batch, same flips (keyed on global indices): same losses and seeds."""
    config = tiny_job(training={"gradient_accumulation_steps": 2, "local_batch_size": 2})
    rng = np.random.default_rng()
    batches = [global_batch(config, 8, rng) for _ in range(3)]

    def losses_and_seeds(mesh):
        step, state = compiled_step(config, mesh)
        losses = []
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
            losses.append(float(metrics["loss"]))
        return losses, [int(seed) for seed in jax.tree.leaves(state.seeds)]

    one_losses, one_seeds = losses_and_seeds(mesh_of(1, 1))
    sharded_losses, sharded_seeds = losses_and_seeds(mesh_of(dp, fsdp))
    np.testing.assert_allclose(sharded_losses, one_losses, rtol=2e-5)
    assert sharded_seeds == one_seeds
    assert len(set(one_losses)) == 3


def test_a_mesh_that_does_not_divide_the_weights_is_a_one_line_error(tmp_path):
    """3 devices cannot split aixsim-debug's hidden size of 128."""
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "jaxflip.train", "--config", "configs/quickstart.toml", "--job.output_dir",
         str(tmp_path / "run"), "--training.steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "parallelism.fsdp_degree: 3 does not divide" in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
