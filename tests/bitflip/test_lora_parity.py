"""BitFlipLoRALinear against a torch LoRA layer written from NewComputeBench's description
(``BitFlipLinearLora``: y = flip(x) @ flip(W + (B @ A) * alpha / r)^T + b, flips by
mase-triton's ``random_bitflip_fn``), plus its init, trainable set and merging."""

import io
import math
import re
import sys

import jax
import jax.numpy as jnp
import mase_reference
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxflip.bitflip import (BitFlipLinear, BitFlipLoRALinear, LoRAParam, TensorFlip, add_lora, apply_bitflip_rules,
                             merge_lora, named_linears, seed_snapshot)
from jaxflip.models import LlamaConfig, LlamaForCausalLM

mase_reference.install_cpu_kernels()

IN, OUT, RANK, ALPHA = 32, 40, 4, 8.0
SETTINGS = dict(x_p_exp=0.5**6, x_p_frac=0.5**3, x_zero_out_t=50.0, w_p_exp=0.5**5, w_p_frac=0.5**4,
                w_zero_out_t=0.4, x_seed_exp=2, x_seed_frac=4, w_seed_exp=6, w_seed_frac=8)


def assert_close(ours, reference, rtol=2e-5):
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.abs(reference[np.isfinite(reference)]).max(initial=1.0)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * scale)


def lora_pair(rng):
    weight = (rng.standard_normal((OUT, IN)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    lora_a = rng.uniform(-0.2, 0.2, (RANK, IN)).astype(np.float32)
    lora_b = (rng.standard_normal((OUT, RANK)) * 0.05).astype(np.float32)  # non-zero, so both factors matter

    torch_layer = mase_reference.BitFlipLinearLora(IN, OUT, True, mase_reference.device(), torch.float32, r=RANK, lora_alpha=ALPHA, **SETTINGS)
    with torch.no_grad():
        for parameter, value in ((torch_layer.weight, weight), (torch_layer.bias, bias),
                                 (torch_layer.lora_A, lora_a), (torch_layer.lora_B, lora_b)):
            parameter.copy_(mase_reference.to_torch(value, "float32"))
    torch_layer.weight.requires_grad_(False)
    torch_layer.bias.requires_grad_(False)

    ours = BitFlipLoRALinear(IN, OUT, rank=RANK, alpha=ALPHA, use_bias=True, rngs=nnx.Rngs(0))
    for variable, value in ((ours.weight, weight), (ours.bias, bias), (ours.lora_A, lora_a), (ours.lora_B, lora_b)):
        variable[...] = jnp.asarray(value)
    ours.configure(
        TensorFlip.from_probabilities(SETTINGS["x_p_exp"], SETTINGS["x_p_frac"], SETTINGS["x_zero_out_t"]),
        TensorFlip.from_probabilities(SETTINGS["w_p_exp"], SETTINGS["w_p_frac"], SETTINGS["w_zero_out_t"]),
        (SETTINGS["x_seed_exp"], SETTINGS["x_seed_frac"], SETTINGS["w_seed_exp"], SETTINGS["w_seed_frac"]),
    )
    return torch_layer, ours


def test_lora_layer_matches_newcomputebench_lora_over_three_calls():
    rng = np.random.default_rng()
    torch_layer, ours = lora_pair(rng)

    @nnx.jit
    def step(layer, x, grad_y):
        def loss(layer):
            y = layer(x)
            return jnp.sum(y * grad_y), y
        # only the LoRA factors are differentiated, as in NewComputeBench's fine-tune
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam), has_aux=True)(layer)

    for call in range(3):
        x = rng.standard_normal((3, 5, IN)).astype(np.float32)
        grad_y = rng.standard_normal((3, 5, OUT)).astype(np.float32)
        torch_layer.zero_grad()
        y_torch = torch_layer(mase_reference.to_torch(x, "float32"))
        (y_torch * mase_reference.to_torch(grad_y, "float32")).sum().backward()

        (_, y), grads = step(ours, jnp.asarray(x), jnp.asarray(grad_y))

        assert_close(y, y_torch.detach().cpu().numpy())
        assert_close(grads["lora_A"][...], torch_layer.lora_A.grad.cpu().numpy())
        assert_close(grads["lora_B"][...], torch_layer.lora_B.grad.cpu().numpy())
        assert set(grads.keys()) == {"lora_A", "lora_B"}
        assert ours.seeds() == (torch_layer.x_seed_exp, torch_layer.x_seed_frac,
                                torch_layer.w_seed_exp, torch_layer.w_seed_frac), f"call {call}"


def test_fresh_adapter_init_and_identity():
    """A kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(in)), B zero: the wrapped layer computes what
    the base layer does, flips and seeds included."""
    rng = np.random.default_rng()
    in_features = 512
    base = BitFlipLinear(in_features, 64, use_bias=True, rngs=nnx.Rngs(1))
    base.configure(TensorFlip(8, 6, 10.0), TensorFlip(7, 5, 1.0), (1, 2, 3, 4))
    lora = BitFlipLoRALinear.from_linear(base, rank=16, alpha=32.0, rngs=nnx.Rngs(2))

    lora_a = np.asarray(lora.lora_A[...])
    bound = 1 / math.sqrt(in_features)
    assert lora_a.shape == (16, in_features) and np.abs(lora_a).max() <= bound
    assert abs(lora_a.std() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(-b, b) has std b / sqrt(3)
    assert not np.any(np.asarray(lora.lora_B[...]))

    x = jnp.asarray(rng.standard_normal((7, in_features)).astype(np.float32))
    np.testing.assert_array_equal(lora(x), base(x))
    assert lora.seeds() == base.seeds()


def test_only_lora_factors_train():
    rng = np.random.default_rng()
    layer = BitFlipLoRALinear(IN, OUT, rank=RANK, alpha=ALPHA, use_bias=True, rngs=nnx.Rngs(0))
    layer.configure(TensorFlip(6, 4, 10.0), TensorFlip(6, 4, 1.0))
    frozen = {name: np.asarray(getattr(layer, name)[...]) for name in ("weight", "bias")}
    lora = {name: np.asarray(getattr(layer, name)[...]) for name in ("lora_A", "lora_B")}
    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=LoRAParam)
    x = jnp.asarray(rng.standard_normal((4, IN)).astype(np.float32))

    for _ in range(2):  # B starts at zero, so A's gradient is zero until B has moved
        grads = nnx.grad(lambda layer: jnp.sum(layer(x) ** 2), argnums=nnx.DiffState(0, LoRAParam))(layer)
        optimizer.update(layer, grads)

    for name, value in frozen.items():
        np.testing.assert_array_equal(getattr(layer, name)[...], value)
    for name, value in lora.items():
        assert not np.array_equal(getattr(layer, name)[...], value), name


def test_merge_lora_keeps_the_output():
    rng = np.random.default_rng()
    _, lora = lora_pair(rng)
    merged = lora.merge_lora()
    assert type(merged) is BitFlipLinear and merged.seeds() == lora.seeds()
    np.testing.assert_array_equal(
        merged.weight[...], lora.weight[...] + (lora.lora_B[...] @ lora.lora_A[...]) * (ALPHA / RANK))
    x = jnp.asarray(rng.standard_normal((4, IN)).astype(np.float32))
    for _ in range(2):  # the same flips on the same weight, call after call
        np.testing.assert_array_equal(merged(x), lora(x))


def test_add_and_merge_lora_on_a_model():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    # flips in the MLPs only: every flipped tensor costs compile time
    apply_bitflip_rules(model, {r".*\.mlp\..*": dict(x_p_exp=0.5**10, x_p_frac=0.5**10, x_zero_out_t=30.0,
                                                    w_p_exp=0.5**10, w_p_frac=0.5**10, w_zero_out_t=1.0)})
    tokens = jnp.asarray(np.random.default_rng().integers(0, config.vocab_size, (2, 8)))
    snapshot = seed_snapshot(model)
    base_logits = model(tokens)

    nnx.update(model, snapshot)
    wrapped = add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    assert len(wrapped) == 14 and "lm_head" not in wrapped
    assert type(model.lm_head) is BitFlipLinear
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) == 2 * 14
    np.testing.assert_array_equal(model(tokens), base_logits)  # B = 0: same flips, same logits

    for layer in named_linears(model).values():
        if isinstance(layer, BitFlipLoRALinear):
            layer.lora_B[...] = 0.05 * jnp.ones_like(layer.lora_B[...])
    snapshot = seed_snapshot(model)
    lora_logits = model(tokens)
    nnx.update(model, snapshot)
    assert sorted(merge_lora(model)) == sorted(wrapped)
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))
    np.testing.assert_allclose(model(tokens), lora_logits, rtol=1e-6, atol=1e-6)
    assert not np.allclose(lora_logits, base_logits)


class Terminal(io.StringIO):
    """A file that says it is a terminal, as stderr is in a shell."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_adding_adapters_counts_the_layers_on_a_terminal_only(terminal, monkeypatch):
    layers = int(np.random.default_rng().integers(1, 4))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    linears = 7 * layers + 1  # the LM head is counted, and keeps no adapter
    assert bool(re.search(rf"LoRA adapters: .* 0/{linears} \[", stderr.getvalue())) == terminal
    assert terminal or stderr.getvalue() == ""
