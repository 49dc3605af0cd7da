"""``torch.compile`` of a model with bridge layers, against the same model with mase-triton's
layers (eager; on CPU its Triton kernels run in the interpreter).

The layers keep their seeds as int attributes, as mase-triton's do; with
``torch._dynamo.config.allow_unspec_int_on_nn_module`` they become symbolic after the first
recompile, so the compiled model does not recompile at every call."""

import mase_reference
import numpy as np
import pytest
import torch
from mase_triton.random_bitflip.layers import RandomBitFlipDropout as MaseDropout
from mase_triton.random_bitflip.layers import RandomBitFlipLinear as MaseLinear

from jaxflip.torch_bridge import RandomBitFlipDropout, RandomBitFlipLinear

mase_reference.install_cpu_kernels()

# thresholds float32 and bf16 represent exactly (the interpreter casts scalar thresholds otherwise)
FIRST = dict(x_p_exp=0.5**4, x_p_frac=0.5**3, x_zero_out_t=64.0, w_p_exp=0.5**5, w_p_frac=0.5**2, w_zero_out_t=0.5,
             x_seed_exp=3, x_seed_frac=8)
DROPOUT = dict(p_exp=0.5**6, p_frac=0.5**2, zero_out_t=16.0, seed_exp=2, seed_frac=5)
SECOND = dict(x_p_exp=None, x_p_frac=None, x_zero_out_t=None, w_p_exp=0.5**7, w_p_frac=0.5**9, w_zero_out_t=2.0)
SEED_ATTRIBUTES = ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac", "seed_exp", "seed_frac")


def model_pair(features: tuple[int, ...], dtype: torch.dtype, device: str, rng) -> tuple[torch.nn.Module, ...]:
    """The same random weights in a model of mase-triton's layers and one of the bridge's: with
    three ``features``, flip-linear, ReLU, flip-dropout, flip-linear; with two, flip-dropout,
    flip-linear (every flip before any matmul, on bit-identical tensors)."""
    linears = [torch.nn.Linear(i, o, dtype=dtype, device=device) for i, o in zip(features, features[1:])]
    with torch.no_grad():
        for parameter in (parameter for linear in linears for parameter in linear.parameters()):
            parameter.copy_(torch.from_numpy(rng.standard_normal(tuple(parameter.shape)).astype(np.float32) * 0.3))
    models = []
    for linear_cls, dropout_cls in ((MaseLinear, MaseDropout), (RandomBitFlipLinear, RandomBitFlipDropout)):
        if len(linears) == 2:
            layers = [linear_cls.from_linear(linears[0], **FIRST), torch.nn.ReLU(), dropout_cls(**DROPOUT),
                      linear_cls.from_linear(linears[1], **SECOND)]
        else:
            layers = [dropout_cls(**DROPOUT), linear_cls.from_linear(linears[0], **FIRST)]
        models.append(torch.nn.Sequential(*layers))
    return tuple(models)


def seeds(model: torch.nn.Module) -> list[tuple[str, int]]:
    return [(f"{name}.{attribute}", getattr(module, attribute)) for name, module in model.named_modules()
            for attribute in SEED_ATTRIBUTES if hasattr(module, attribute)]


def assert_compiled_matches_mase(dtype: torch.dtype, device: str, backend: str, features, tokens, exact: bool):
    """Over three calls on fresh random inputs: the output and dx (bit for bit when ``exact``)
    and every layer's seeds."""
    rng = np.random.default_rng()
    mase, ours = model_pair(features, dtype, device, rng)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = torch.compile(ours, backend=backend, fullgraph=True)
        for call in range(3):
            x = torch.from_numpy(rng.standard_normal((tokens, features[0])).astype(np.float32)).to(device, dtype)
            results = []
            for model in (mase, compiled):
                x_leaf = x.clone().requires_grad_(True)
                y = model(x_leaf)
                y.float().square().sum().backward()
                results.append((y.detach(), x_leaf.grad))
            tolerance = dict(rtol=0, atol=0) if exact else {}
            for got, expected in zip(results[1], results[0]):
                torch.testing.assert_close(got, expected, equal_nan=True, **tolerance,
                                           msg=lambda message: f"call {call}: {message}")
            assert seeds(ours) == seeds(mase), f"call {call}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_compiled_model_with_bridge_layers_matches_mase_layers(dtype, device):
    """aot_eager: torch.compile traces the custom ops through their fake implementations, both
    passes, then runs the same aten ops as eager: exact."""
    features, tokens = ((32, 48, 16), 6) if device == "cpu" else ((1024, 2048, 512), 256)
    assert_compiled_matches_mase(dtype, device, "aot_eager", features, tokens, exact=True)


def test_a_compiled_model_recompiles_once_for_its_seeds_then_no_more():
    rng = np.random.default_rng()
    _, ours = model_pair((16, 24, 8), torch.float32, "cpu", rng)
    torch._dynamo.reset()
    compiles = []
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = torch.compile(ours, backend=lambda graph, inputs: compiles.append(graph) or graph, fullgraph=True)
        for _ in range(4):
            compiled(torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32)))
    assert len(compiles) == 2  # seeds static at first, symbolic after they change


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_model_compiled_by_inductor_on_cuda_matches_mase_layers(dtype):
    """On a GPU, Inductor, on a model whose flips all come before its matmul (dropout, then the
    linear's input and weight flips): the flips are mase-triton's bit for bit, the seeds equal
    theirs; Inductor's matmul and fused bias may round differently from eager, so the output
    and dx are compared at the dtype's tolerance. (After a matmul, a last-bit difference can
    become a large one through fraction flips or the zero-out threshold: that model is the
    aot_eager test's.)"""
    assert_compiled_matches_mase(dtype, "cuda", "inductor", features=(1024, 2048), tokens=512, exact=False)
