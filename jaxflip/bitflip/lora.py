"""``BitFlipLoRALinear``: NewComputeBench's ``BitFlipLinearLora`` in Flax NNX.

    y = flip(x) @ flip(W + (B @ A) * alpha / r)^T + b

``A`` (r, in) starts kaiming-uniform with a = sqrt(5) (torch's Linear init: U(+-1/sqrt(in))),
``B`` (out, r) starts at zero, so a fresh adapter leaves the layer unchanged. ``A`` and ``B``
are ``LoRAParam``s: train only them with ``nnx.Optimizer(model, tx, wrt=LoRAParam)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from jaxflip.bitflip.linear import LM_HEAD, BitFlipLinear, named_linears, replace_module
from jaxflip.bitflip.seeds import SEED_NAMES

# the logical axis of the adapters' rank dimension; jaxflip.models.sharding maps it to a mesh axis
LORA_RANK_AXIS = "lora_rank"


class LoRAParam(nnx.Param):
    """A LoRA factor. A subclass of ``nnx.Param``, so ``wrt=LoRAParam`` selects only these."""


def kaiming_uniform_sqrt5(key, shape, dtype):
    """``torch.nn.init.kaiming_uniform_(a=sqrt(5))`` on a ``(fan_out, fan_in)`` matrix:
    gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in) gives the bound 1 / sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def merged_weight(weight, lora_a, lora_b, *, rank: int, alpha: float) -> jax.Array:
    """``W + (B @ A) * alpha / r`` in W's dtype: what the layer computes with, and what
    merging (here or in the converters) writes."""
    update = (jnp.asarray(lora_b) @ jnp.asarray(lora_a)) * (alpha / rank)
    return jnp.asarray(weight) + update.astype(weight.dtype)


class BitFlipLoRALinear(BitFlipLinear):
    """A ``BitFlipLinear`` plus a rank-``rank`` adapter scaled by ``alpha / rank``; the flips
    apply to the adapted weight."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, rngs: nnx.Rngs, **linear_kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        out_axis, in_axis = self.axes
        param_dtype = self.weight[...].dtype
        self.rank = rank
        self.alpha = alpha
        self.lora_A = LoRAParam(kaiming_uniform_sqrt5(rngs.params(), (rank, in_features), param_dtype),
                                out_sharding=(LORA_RANK_AXIS, in_axis), eager_sharding=False)
        self.lora_B = LoRAParam(jnp.zeros((out_features, rank), param_dtype),
                                out_sharding=(out_axis, LORA_RANK_AXIS), eager_sharding=False)

    @classmethod
    def from_linear(cls, linear: BitFlipLinear, *, rank: int, alpha: float, rngs: nnx.Rngs) -> BitFlipLoRALinear:
        """Wrap ``linear``: same weight and bias arrays, flips and current seeds, plus a fresh
        adapter."""
        lora = cls(linear.in_features, linear.out_features, rank=rank, alpha=alpha, rngs=rngs,
                   use_bias=linear.bias is not None, axes=linear.axes, layout=linear.layout,
                   param_dtype=linear.weight[...].dtype, dtype=linear.dtype,
                   weight_init=lambda key, shape, dtype: linear.weight[...])
        _copy_rest(linear, lora)
        return lora

    def effective_weight(self) -> jax.Array:
        return merged_weight(self.weight[...], self.lora_A[...], self.lora_B[...], rank=self.rank, alpha=self.alpha)

    def merge_lora(self) -> BitFlipLinear:
        """A plain ``BitFlipLinear`` with ``W + (B @ A) * alpha / r`` as its weight, the same
        bias, flips and current seeds."""
        merged_weight = self.effective_weight()
        merged = BitFlipLinear(self.in_features, self.out_features, use_bias=self.bias is not None,
                               axes=self.axes, layout=self.layout, param_dtype=merged_weight.dtype, dtype=self.dtype,
                               weight_init=lambda key, shape, dtype: merged_weight, rngs=nnx.Rngs(0))
        _copy_rest(self, merged)
        return merged


def _copy_rest(source: BitFlipLinear, target: BitFlipLinear) -> None:
    """Everything of a Linear but its weight: bias, flip arming, settings and seeds, as new
    Variables holding the source's values (writing the values into the target's Variables
    with ``[...] =`` would do the same, but under ``nnx.eval_shape`` each such write costs ~60 ms of jax tracer
    bookkeeping: minutes for a 70B model)."""
    target.bias = None if source.bias is None else _copy_variable(source.bias)
    target.x_armed, target.w_armed, target.x_seeds_shared = source.x_armed, source.w_armed, source.x_seeds_shared
    for name in (*SEED_NAMES, "x_setting", "w_setting"):
        setattr(target, name, _copy_variable(getattr(source, name)))


def _copy_variable(variable: nnx.Variable) -> nnx.Variable:
    return type(variable)(variable.get_value(), **variable.get_metadata())


def add_lora(model: nnx.Module, *, rank: int, alpha: float, rngs: nnx.Rngs,
             skip: tuple[str, ...] = (LM_HEAD,)) -> list[str]:
    """Replace every ``BitFlipLinear`` of ``model`` but those named in ``skip`` by a
    ``BitFlipLoRALinear`` wrapping it (as NewComputeBench does, the LM head keeps no adapter).
    Returns the names of the wrapped layers. On a terminal a transient bar counts the layers:
    under ``nnx.eval_shape`` (``--plan``) each costs more than the one before (jax pretty-prints
    the trace so far at every write of ``rngs``' counter): most of the 70B plan's minute."""
    wrapped = []
    for name, linear in tqdm(named_linears(model).items(), desc="LoRA adapters", unit="layer", disable=None,
                             leave=False):
        if name in skip or isinstance(linear, BitFlipLoRALinear):
            continue
        replace_module(model, name, BitFlipLoRALinear.from_linear(linear, rank=rank, alpha=alpha, rngs=rngs))
        wrapped.append(name)
    return wrapped


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter of ``model`` into its weight (``BitFlipLoRALinear`` ->
    ``BitFlipLinear``). Returns the names of the merged layers."""
    merged = []
    for name, linear in named_linears(model).items():
        if isinstance(linear, BitFlipLoRALinear):
            replace_module(model, name, linear.merge_lora())
            merged.append(name)
    return merged
