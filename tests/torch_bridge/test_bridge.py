"""The torch bridge against mase-triton (its Triton kernels on CPU through the interpreter):
the layer over consecutive calls, and the rule transform of a whole HF model."""

import os

import mase_reference
import numpy as np
import pytest
import torch
from hf_models import random_hf_model, random_tokens, tiny_hf_config
from mase_triton.random_bitflip.layers import RandomBitFlipLinear as MaseLinear

from jaxflip.bitflip import MAX_HALVES, BitflipConfig, TensorFlip
from jaxflip.torch_bridge import RandomBitFlipLinear, transform_model
from jaxflip.torch_bridge.functional import to_jax, to_torch

mase_reference.install_cpu_kernels()

IN, OUT = 32, 48
BOTH_FLIPPED = dict(x_p_exp=0.5**5, x_p_frac=0.5**3, x_zero_out_t=100.0, w_p_exp=0.5**6, w_p_frac=0.5**4,
                    w_zero_out_t=0.5, x_seed_exp=7, x_seed_frac=0, w_seed_exp=3, w_seed_frac=9)
X_ONLY_NO_ZERO_OUT = dict(x_p_exp=0.5**9, x_p_frac=0.5**2, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                          w_zero_out_t=None, w_seed_exp=11)
W_ZERO_OUT_ONLY = dict(x_p_exp=None, x_p_frac=None, x_zero_out_t=None, w_p_exp=None, w_p_frac=None,
                       w_zero_out_t=0.05, x_seed_exp=5, x_seed_frac=6)
SEED_NAMES = ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac")


def seeds(layer) -> tuple[int, ...]:
    return tuple(getattr(layer, name) for name in SEED_NAMES)


@pytest.mark.parametrize("settings, dtype", [
    (BOTH_FLIPPED, torch.float32), (BOTH_FLIPPED, torch.bfloat16), (X_ONLY_NO_ZERO_OUT, torch.float32),
    (W_ZERO_OUT_ONLY, torch.float32),
], ids=["both-flipped", "both-flipped-bf16", "x-only-no-zero-out", "w-zero-out-only"])
def test_layer_matches_mase_over_three_calls(settings, dtype):
    assert_layer_matches_mase(settings, dtype, "cpu")


# the flips of every launch: few Philox calls (256/8) and many (32/1 with early exit, halves >= 13)
GPU_SETTINGS = [BOTH_FLIPPED, dict(BOTH_FLIPPED, x_p_exp=0.5**16, x_p_frac=0.5**24, w_p_exp=0.5**13, w_p_frac=0.5**20)]


@pytest.mark.gpu
@pytest.mark.parametrize("settings", GPU_SETTINGS, ids=["few-philox-calls", "early-exit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layer_on_cuda_is_bit_equal_to_mase(settings, dtype):
    """On a GPU: the bridge runs the compiled Pallas kernel on the CUDA tensors' memory, mase-triton
    its CUDA kernel; forward, dx and dW equal bit for bit. A 1024 x 1024 weight and 1M input
    elements: even at 0.5^13 to 0.5^16 each group flips hundreds of bits per call."""
    assert_layer_matches_mase(settings, dtype, "cuda", features=(1024, 1024), tokens=(8, 128))


def assert_layer_matches_mase(settings: dict, dtype: torch.dtype, device: str, features=(IN, OUT),
                              tokens=(4, 8)) -> None:
    """Our layer and mase-triton's, holding the same random weights, over three calls on fresh
    random inputs: the same output, dx, dW and db bit for bit, and the same seeds."""
    rng = np.random.default_rng()
    in_features, out_features = features
    linear = torch.nn.Linear(in_features, out_features, bias=True, dtype=dtype, device=device)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.2))
        linear.bias.copy_(torch.from_numpy(rng.standard_normal(out_features).astype(np.float32)))
    mase = MaseLinear.from_linear(linear, **settings)
    ours = RandomBitFlipLinear.from_linear(linear, **settings)
    for call in range(3):
        x = torch.from_numpy(rng.standard_normal((*tokens, in_features)).astype(np.float32)).to(device, dtype)
        grad_y = torch.from_numpy(rng.standard_normal((*tokens, out_features)).astype(np.float32)).to(device, dtype)
        outputs, grads = [], []
        for layer in (mase, ours):
            layer.zero_grad()
            x_leaf = x.clone().requires_grad_(True)
            y = layer(x_leaf)
            (y * grad_y).sum().backward()
            outputs.append(y.detach())
            grads.append((x_leaf.grad, layer.weight.grad, layer.bias.grad))
        # the same flipped bits go through the same torch matmul: equal, not just close
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0, equal_nan=True)
        for ours_grad, mase_grad in zip(grads[1], grads[0]):
            torch.testing.assert_close(ours_grad, mase_grad, rtol=0, atol=0, equal_nan=True)
        assert seeds(ours) == seeds(mase), f"call {call}"
    assert not torch.allclose(outputs[1], linear(x).detach(), rtol=1e-4), "the settings should change the output"


def test_dlpack_shares_memory_both_ways():
    tensor = torch.randn(16, 8, dtype=torch.bfloat16)
    array = to_jax(tensor)
    assert array.unsafe_buffer_pointer() == tensor.data_ptr()
    assert to_torch(array).data_ptr() == tensor.data_ptr()


def test_transform_flips_the_layers_mase_would_with_the_same_logits():
    """Our transform against the NewComputeBench transform with mase-triton's layers."""
    from mase_reference import MODEL_RULES as RULES
    from mase_reference import newcomputebench_transform

    rng = np.random.default_rng()
    config = tiny_hf_config()
    reference = random_hf_model(config, rng)
    ours = random_hf_model(config, rng)
    ours.load_state_dict(reference.state_dict())
    mase_layers = newcomputebench_transform(reference, RULES)
    table = transform_model(ours, RULES)
    assert sorted(row.layer for row in table if row.flipped) == sorted(mase_layers)
    modules = dict(ours.named_modules())
    for call in range(2):
        tokens = torch.from_numpy(random_tokens(rng, config, (2, 8)))
        with torch.no_grad():
            expected, got = reference(tokens).logits, ours(tokens).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), equal_nan=True)
        for name, layer in mase_layers.items():
            assert seeds(modules[name]) == seeds(layer), f"call {call}: {name}"


def test_transform_from_a_bitflip_config_keeps_its_halves_and_independent_seeds():
    """A ``BitflipConfig`` (what ``--bitflip-config`` reads) applied to a torch model: each
    flipped layer gets the halves and starting seeds of the config's own table."""
    rng = np.random.default_rng()
    halves = [int(h) for h in rng.integers(1, MAX_HALVES + 1, 4)]
    config = BitflipConfig(x_p_exp=0.5 ** halves[0], x_p_frac=0.5 ** halves[1], w_p_exp=0.5 ** halves[2],
                           w_p_frac=0.5 ** halves[3], w_zero_out_t=float(rng.uniform(0.5, 2)),
                           base_seed=int(rng.integers(1000)), skip_patterns=["lm_head", "self_attn"])
    model = random_hf_model(tiny_hf_config(), rng)
    table = transform_model(model, config)
    modules = dict(model.named_modules())
    flipped = [row for row in table if row.flipped]
    assert {row.layer.rsplit(".", 1)[-1] for row in flipped} == {"gate_proj", "up_proj", "down_proj"}
    assert len({row.seeds for row in flipped}) == len(flipped), "independent seeds differ per layer"
    for row in flipped:
        layer = modules[row.layer]
        assert isinstance(layer, RandomBitFlipLinear) and seeds(layer) == row.seeds
        assert (layer.x_nearest_exp_halves, layer.x_nearest_frac_halves, layer.w_nearest_exp_halves,
                layer.w_nearest_frac_halves, layer.w_zero_out_t) == (*halves, config.w_zero_out_t)
    assert not isinstance(modules["model.layers.0.self_attn.q_proj"], RandomBitFlipLinear)


def test_a_layer_refuses_a_probability_the_kernel_cannot_flip_when_built():
    linear = torch.nn.Linear(IN, OUT)
    with pytest.raises(ValueError, match=r"w_p_frac=.* is below the smallest supported flip probability"):
        RandomBitFlipLinear.from_linear(linear, w_p_frac=0.5 ** (MAX_HALVES + 1))
    layer = RandomBitFlipLinear.from_linear(linear)
    flip = TensorFlip(exp_halves=int(np.random.default_rng().integers(1, MAX_HALVES + 1)))
    layer.configure(flip, TensorFlip())
    assert layer.x_nearest_exp_halves == flip.exp_halves and layer.x_p_exp == 0.5**flip.exp_halves


def test_importing_the_bridge_stops_jax_preallocating_before_its_backend_starts():
    """In a fresh process: set, and JAX has not started a backend, so it takes effect when it does."""
    import json
    import subprocess
    import sys

    probe = ("import json, os, jaxflip.torch_bridge, jax._src.xla_bridge as xb; "
             "print(json.dumps([os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), xb.backends_are_initialized()]))")
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                                     "JAXFLIP_TORCH_BRIDGE_PREALLOCATE")}
    result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == ["false", False]


@pytest.mark.parametrize("environment, expected", [
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, "true"),  # the user's own setting wins
    ({"JAXFLIP_TORCH_BRIDGE_PREALLOCATE": "1"}, None),  # JAX's default, on request
])
def test_the_preallocation_setting_can_be_overridden(environment, expected, monkeypatch):
    from jaxflip.torch_bridge import leave_gpu_to_torch

    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "JAXFLIP_TORCH_BRIDGE_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    leave_gpu_to_torch()
    assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == expected
