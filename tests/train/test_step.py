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
from jaxflip.train.program_stats import executed_count
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


@pytest.mark.parametrize("remat,lora,flips_per_tensor", [("full", 0, 2), ("flips", 0, 1), ("dots_flips", 4, 1)])
def test_each_flipped_tensor_is_flipped_once_per_micro_batch(tiny_job, monkeypatch, remat, lora, flips_per_tensor):
    """Kernel launches in one optimizer step (scanned layers, two micro-batches): one per flipped
    tensor and micro-batch; "full" remat flips again in the recomputation, "flips" does not."""
    monkeypatch.setenv("JAXFLIP_BITFLIP_BACKEND", "interpret")  # one pallas_call per flip, to count
    config = tiny_job(bitflip={"rules": EVERY_DOWN_PROJ}, model={"remat": remat}, lora={"r": lora, "lora_alpha": 8.0})
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    tx = make_optimizer(config.training)
    graphdef, state, shardings, scanned = init_state(model, tx, mesh, lora=lora > 0)
    step = make_train_step(graphdef, tx, config.training, shardings, batch_sharding(mesh))
    batch = jax.ShapeDtypeStruct((config.training.gradient_accumulation_steps, 1, config.training.seq_len + 1),
                                 np.int32)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(step.jitted)(state, batch)
    flipped_tensors = 2 * model.config.num_hidden_layers  # each down_proj's input and weight
    assert scanned and config.training.gradient_accumulation_steps == 2
    assert executed_count(jaxpr.jaxpr, "pallas_call") == flips_per_tensor * flipped_tensors * 2


# Exponent flips on activations, fraction flips on weights only: the two frameworks' float32
# values differ by an ulp here and there, and a fraction-bit XOR can amplify that (see
# tests/models/test_model_bitflip_parity.py); an exponent XOR keeps it an ulp.
PARITY_FLIP = dict(x_p_exp=0.5**7, x_p_frac=None, x_zero_out_t=30.0, w_p_exp=0.5**9, w_p_frac=0.5**5,
                   w_zero_out_t=0.4, x_seed_exp=3, x_seed_frac=0, w_seed_exp=7, w_seed_frac=11)
# three Linears (each mase-triton flip runs in the Triton interpreter, each of ours compiles Philox)
PARITY_RULES = {r"model\.layers\.0\.mlp\.down_proj|model\.layers\.1\.self_attn\.(q|o)_proj": PARITY_FLIP}
PARITY_LORA = {"r": 4, "lora_alpha": 8.0}


def mase_recipe_losses(hf_model, batches, t, lora: bool) -> list[float]:
    """NewComputeBench's recipe in torch: mase-triton's layers (or its LoRA layer), AdamW, the
    mean loss of the micro-batches, one optimizer step per batch."""
    import torch

    trainable = [p for name, p in hf_model.named_parameters() if not lora or "lora_" in name]
    for name, parameter in hf_model.named_parameters():
        parameter.requires_grad_(not lora or "lora_" in name)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        total = 0.0
        for tokens in torch.from_numpy(batch).long():
            logits = hf_model(tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            (loss / len(batch)).backward()
            total += loss.item()
        optimizer.step()
        losses.append(total / len(batch))
    return losses


@pytest.mark.slow  # ~40-60 s each on 2 CPU cores: the train step's compile (~30 s) and mase-triton interpreted
@pytest.mark.parametrize("lora,remat", [(False, "none"), (True, "flips")])
def test_training_with_flips_matches_the_torch_recipe_with_mase_layers(lora, remat):
    """Three optimizer steps of two micro-batches each: the same losses as HF transformers with
    mase-triton's layers on the same weights, data, seeds and AdamW, and the same seeds after."""
    import mase_reference
    import torch
    from hf_models import flax_twin, random_hf_model, tiny_hf_config

    from jaxflip.bitflip import add_lora, apply_bitflip_rules, named_linears
    from jaxflip.train.train_config import TrainingConfig

    mase_reference.install_cpu_kernels()
    rng = np.random.default_rng()
    hf_model = random_hf_model(tiny_hf_config(), rng)
    batches = [rng.integers(0, hf_model.config.vocab_size, (2, 2, 9), dtype=np.int32) for _ in range(3)]
    t = TrainingConfig(lr=1e-2, warmup_steps=0, decay="constant", max_norm=0.0, eps=1e-3, weight_decay=0.1)
    model = flax_twin(hf_model)
    with torch.no_grad():
        clean_loss = float(torch.nn.functional.cross_entropy(
            hf_model(torch.from_numpy(batches[0][0, :, :-1]).long()).logits.reshape(-1, hf_model.config.vocab_size),
            torch.from_numpy(batches[0][0, :, 1:]).long().reshape(-1)))

    hf_model.to(mase_reference.device())
    mase_layers = mase_reference.newcomputebench_transform(hf_model, PARITY_RULES, PARITY_LORA if lora else None)
    apply_bitflip_rules(model, PARITY_RULES)
    if lora:
        add_lora(model, rank=PARITY_LORA["r"], alpha=PARITY_LORA["lora_alpha"], rngs=nnx.Rngs(0),
                 skip=tuple(name for name in named_linears(model) if name not in mase_layers))
        for name, layer in named_linears(model).items():
            if name in mase_layers:  # the same A (B starts at zero in both)
                layer.lora_A[...] = mase_layers[name].lora_A.detach().cpu().numpy()
    model.model.set_remat(remat)
    reference_losses = mase_recipe_losses(hf_model, batches, t, lora)

    tx = make_optimizer(t)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    graphdef, state, shardings, _ = init_state(model, tx, mesh, lora=lora)
    state = jax.device_put(state, shardings)  # the twin's weights are not on the mesh yet: one compile, not two
    step = make_train_step(graphdef, tx, t, shardings, batch_sharding(mesh))
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
    assert abs(reference_losses[0] - clean_loss) > 1e-3 and reference_losses[2] != reference_losses[0]
    trained = named_linears(merge_model(graphdef, state.trainable, state.frozen, state.seeds))
    for name, layer in mase_layers.items():
        assert trained[name].seeds() == (layer.x_seed_exp, layer.x_seed_frac, layer.w_seed_exp, layer.w_seed_frac)
