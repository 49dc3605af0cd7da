"""The memory plan: its state bytes are the real train state's per-device shards."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxflip.models.sharding import make_mesh
from jaxflip.train import setup
from jaxflip.train.__main__ import main
from jaxflip.train.plan import Scenario, abstract_training, plan
from jaxflip.train.step import init_state, make_optimizer


def per_device_bytes(tree) -> int:
    """The largest per-device total of ``tree``'s arrays: what one device holds."""
    totals = {}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values())


@pytest.mark.parametrize("lora", [0, 4])
def test_the_plans_state_bytes_are_the_train_states_per_device_bytes(tiny_job, lora):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 8 host devices)")
    rng = np.random.default_rng()
    config = tiny_job(lora={"r": lora, "lora_alpha": 8.0},
                      model={"flavor": "aixsim-debug", "vocab_size": int(rng.integers(2, 9)) * 128})
    mesh = make_mesh(dp=1, fsdp=4, devices=jax.devices()[:4])
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    _, state, _, _ = init_state(model, make_optimizer(config.training), mesh, lora > 0)
    [planned] = plan(config, [Scenario(4, 80)])
    assert planned.mesh == {"dp": 1, "fsdp": 4}
    assert planned.state["trainable"] == per_device_bytes(state.trainable)
    assert planned.state["frozen"] == (per_device_bytes(state.frozen) if jax.tree.leaves(state.frozen) else 0)
    assert planned.state["optimizer"] == per_device_bytes(state.opt_state)
    assert planned.state["seeds"] == per_device_bytes((state.seeds, state.step))


def test_the_largest_micro_batch_is_the_largest_that_fits(tiny_job):
    config = tiny_job(model={"flavor": "aixsim-60M"}, training={"seq_len": 2048, "local_batch_size": 1})
    training = abstract_training(config)
    gb = float(np.random.default_rng().uniform(20, 80))
    [one_row] = plan(config, [Scenario(2, gb)], training=training)
    fits = one_row.max_local_batch
    assert fits > 1
    for rows, expected in ((fits, True), (fits + 1, False)):
        bigger = dataclasses.replace(config, training=dataclasses.replace(config.training, local_batch_size=rows))
        [p] = plan(bigger, [Scenario(2, gb)], training=training)
        assert (p.total <= p.usable) is expected


def test_a_bad_scenario_is_one_line_error_and_exit_2(capsys):
    assert main(["--plan", "2xbig"]) == 2
    assert capsys.readouterr().err.strip() == "error: --plan: expected GPUSxGB entries such as 2x141,4x80, got '2xbig'"


def test_the_plan_says_first_that_it_builds_the_train_states_shapes(capsys):
    """Said before the slow part (building the state's shapes), so the plan is never silent."""
    gb = int(np.random.default_rng().integers(8, 200))
    assert main(["--plan", f"1x{gb}"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: building the train state of aixsim-debug as shapes") and f"1x{gb}" in out
