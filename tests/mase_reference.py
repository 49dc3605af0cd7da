"""mase-triton, the referee, runnable without a GPU.

On a machine without CUDA, ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` before triton
is imported) runs mase-triton's own Triton kernels on CPU tensors. Per SPEC.md: launch the
kernel under the autotuner with one large block, pass a dummy halves for a skipped group
(the launcher cannot pack None), and, for the torch layers, register the custom ops'
original bodies as their CPU kernels. With CUDA present the same functions run on the GPU.
"""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import torch

try:
    import triton
    from mase_triton.random_bitflip import core as mase_core
    from mase_triton.random_bitflip.layers import RandomBitFlipLinear
    from mase_triton.utils.torch_module import set_layer_by_name
except ImportError:  # pragma: no cover - the parity extra is not installed
    triton = mase_core = None
    RandomBitFlipLinear = torch.nn.Linear  # a base class for BitFlipLinearLora that is never used

INTERPRET_BLOCK = 65536
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


# Rules for whole-model parity (tests/models, tests/torch_bridge). Fraction flips on weights
# only: the two frameworks' float32 activations differ by an ulp here and there, and XOR
# amplifies that when the two values differ in a run of low bits (0111.. vs 1000..); with
# activation fraction flips the whole-model test failed once in 13 runs (once in CI,
# 2026-11-26). Weights are copied bit for bit, so their fraction flips agree exactly; activation
# fraction flips are checked on identical inputs in tests/bitflip/test_linear_parity.py.
MODEL_RULES = {
    r"model\.layers\.1\.mlp\.(gate|up)_proj": dict(
        x_p_exp=0.5**9, x_p_frac=None, x_zero_out_t=20.0, w_p_exp=0.5**8, w_p_frac=0.5**10, w_zero_out_t=0.5,
        x_seed_exp=11, x_seed_frac=3, w_seed_exp=5, w_seed_frac=1),
    r"model\.layers\.0\.self_attn\.o_proj": None,
    "default": dict(x_p_exp=0.5**10, x_p_frac=None, x_zero_out_t=50.0, w_p_exp=0.5**10, w_p_frac=0.5**10,
                    w_zero_out_t=1.0),
}


def available() -> bool:
    return mase_core is not None


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(x: np.ndarray | object, dtype_name: str) -> torch.Tensor:
    """Exact copy of a numpy/JAX array (bit pattern preserved) as a torch tensor."""
    bits = np.asarray(x).view(np.uint32 if dtype_name == "float32" else np.uint16)
    signed = bits.view(np.int32 if dtype_name == "float32" else np.int16)
    return torch.from_numpy(signed.copy()).view(TORCH_DTYPES[dtype_name]).to(device())


def bits_of(t: torch.Tensor) -> np.ndarray:
    name = str(t.dtype).removeprefix("torch.")
    raw = t.detach().cpu().contiguous().view(_BITS[name]).numpy()
    return raw.view(np.uint32 if name == "float32" else np.uint16)


def _meta(t: torch.Tensor, exp_halves, frac_halves):
    from mase_triton.dtype import TORCH_DTYPE_TO_TRITON

    return dict(
        exp_halves=exp_halves if exp_halves is not None else 1,
        frac_halves=frac_halves if frac_halves is not None else 1,
        SKIP_EXP_FLIP=exp_halves is None,
        SKIP_FRAC_FLIP=frac_halves is None,
        INPUT_DTYPE=TORCH_DTYPE_TO_TRITON[t.dtype],
        BIN_DTYPE=mase_core.BIT_FLIP_DTYPE_MAP[t.dtype],
        EXP_PHILOX_N_ROUNDS=mase_core._get_philox_n_rounds(exp_halves),
        FRAC_PHILOX_N_ROUNDS=mase_core._get_philox_n_rounds(frac_halves),
    )


GPU_BLOCK = 1024  # one of mase's autotuned configs; its output does not depend on the block


def _launch(kernel_name: str, n: int, *args, **kwargs):
    """The kernel under mase's autotuner, at one block size: the flips are keyed on global
    offsets, so any block gives the same bits, and autotuning 16 configs for every new tensor
    size would be most of a GPU test run's time."""
    block = INTERPRET_BLOCK if device() == "cpu" else GPU_BLOCK
    getattr(mase_core, kernel_name).fn[(math.ceil(n / block),)](*args, BLOCK_SIZE=block, **kwargs)


def mase_forward(x: torch.Tensor, exp_halves, frac_halves, seed_exp, seed_frac, threshold):
    """mase-triton's forward kernel on ``x``; also for one group None, which its Python
    wrapper cannot launch."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _launch(
        "_random_bitflip_forward_kernel", x.numel(), x, out,
        n_elements=x.numel(), seed_exp=seed_exp, seed_frac=seed_frac,
        zero_out_threshold=threshold if threshold is not None else 0.0,
        ENABLE_ZERO_OUT=threshold is not None, **_meta(x, exp_halves, frac_halves),
    )
    return out


def mase_backward(x: torch.Tensor, grad_y: torch.Tensor, exp_halves, frac_halves, seed_exp, seed_frac, threshold):
    """mase-triton's zero-out backward kernel (it recomputes the flips to find the mask)."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    grad_x = torch.empty_like(x)
    _launch(
        "_random_bitflip_zero_outed_backward_kernel", x.numel(), x, grad_y, grad_x,
        n_elements=x.numel(), seed_exp=seed_exp, seed_frac=seed_frac,
        zero_out_threshold=threshold, GRAD_DTYPE=_meta(grad_y, None, None)["INPUT_DTYPE"],
        **_meta(x, exp_halves, frac_halves),
    )
    return grad_x


_installed = False


def install_cpu_kernels() -> None:
    """Make mase-triton's torch ops and layers run on CPU tensors through the interpreter."""
    global _installed
    if _installed or device() != "cpu":
        return
    one_block = [triton.Config({"BLOCK_SIZE": INTERPRET_BLOCK}, num_stages=1)]
    mase_core._random_bitflip_forward_kernel.configs = one_block
    mase_core._random_bitflip_zero_outed_backward_kernel.configs = one_block
    mase_core.random_bitflip_fn.register_kernel("cpu")(mase_core.random_bitflip_fn._init_fn)
    mase_core._random_bitflip_backward.register_kernel("cpu")(mase_core._random_bitflip_backward._init_fn)
    torch.cuda.device = lambda index: contextlib.nullcontext()
    _installed = True


class BitFlipLinearLora(RandomBitFlipLinear):
    """NewComputeBench's ``BitFlipLinearLora``: mase's ``RandomBitFlipLinear`` whose flipped
    weight is the LoRA-adapted one, ``W + (B @ A) * lora_alpha / r``."""

    def __init__(self, *args, r, lora_alpha, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaling = lora_alpha / r
        self.lora_A = torch.nn.Parameter(torch.empty(r, self.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        if not (self.x_p_exp is None and self.x_p_frac is None and self.x_zero_out_t is None):
            x, self.x_seed_exp, self.x_seed_frac = mase_core.random_bitflip_fn(
                x, self.x_nearest_exp_halves, self.x_nearest_frac_halves, self.x_seed_exp, self.x_seed_frac,
                self.x_zero_out_t)
        w = self.weight + (self.lora_B @ self.lora_A) * self.scaling
        if not (self.w_p_exp is None and self.w_p_frac is None and self.w_zero_out_t is None):
            w, self.w_seed_exp, self.w_seed_frac = mase_core.random_bitflip_fn(
                w, self.w_nearest_exp_halves, self.w_nearest_frac_halves, self.w_seed_exp, self.w_seed_frac,
                self.w_zero_out_t)
        return torch.nn.functional.linear(x, w, self.bias)


def newcomputebench_transform(model: torch.nn.Module, rules: dict, lora: dict | None = None) -> dict:
    """Replace each nn.Linear a rule selects (first full match in order, else ``default``, the
    LM head only when named) by mase-triton's layer, as NewComputeBench's transform does; with
    ``lora`` (``{"r": ..., "lora_alpha": ...}``) by ``BitFlipLinearLora`` holding the same
    weight and bias (its A fresh, its B zero). Returns the new layers by name."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        pattern = next((p for p in rules if p != "default" and re.fullmatch(p, name)), None)
        if pattern is None and name != "lm_head" and "default" in rules:
            pattern = "default"
        if pattern is None or rules[pattern] is None:
            continue
        if lora is None:
            replaced[name] = RandomBitFlipLinear.from_linear(module, **rules[pattern])
        else:
            replaced[name] = BitFlipLinearLora(module.in_features, module.out_features, module.bias is not None,
                                               module.weight.device, module.weight.dtype, **lora, **rules[pattern])
            with torch.no_grad():
                replaced[name].weight.copy_(module.weight)
                if module.bias is not None:
                    replaced[name].bias.copy_(module.bias)
        set_layer_by_name(model, name, replaced[name])
    return replaced
