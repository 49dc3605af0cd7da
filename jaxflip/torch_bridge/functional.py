"""``random_bitflip_fn`` on torch tensors (mase-triton's name; ``jaxflip.random_bitflip`` is the JAX op): jaxflip's op run by JAX on the tensor's own memory.

Tensors cross between torch and JAX through DLPack, which shares the buffer (no copy on GPU
or CPU), so a torch model gets jaxflip's flips, bit for bit the flips of mase-triton's
``random_bitflip_fn``, wherever JAX can run on the tensor's device. The gradient is jaxflip's
own straight-through VJP (masked by the zero-out), kept from the forward pass.
"""

from __future__ import annotations

from functools import partial

import jax
import torch

from jaxflip.bitflip import check_seed
from jaxflip.kernels_pallas import random_bitflip as jax_random_bitflip
from jaxflip.kernels_pallas.random_bitflip import advance_seed


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """The tensor's memory as a JAX array, row-major (the element order the flips key on)."""
    return jax.dlpack.from_dlpack(tensor.detach().contiguous())


def to_torch(array: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(array)


@partial(jax.jit, static_argnums=(1, 2, 5))
def _flip_with_vjp(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold):
    """``(y, vjp)``; the seeds are traced, so one compilation serves every call."""
    return jax.vjp(lambda x: jax_random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold)[0], x)


@partial(jax.jit, static_argnums=(1, 2, 5))
def _flip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold):
    return jax_random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold)[0]


@jax.jit
def _apply_vjp(vjp, grad_y):
    return vjp(grad_y)[0]


class RandomBitflipFunction(torch.autograd.Function):
    """``y = random_bitflip(x)`` with the straight-through gradient ``dx = dy`` where the
    zero-out kept the element, 0 elsewhere."""

    @staticmethod
    def forward(ctx, x, exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold):
        args = (to_jax(x), exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold)
        if ctx.needs_input_grad[0]:
            y, ctx.vjp = _flip_with_vjp(*args)
        else:
            y = _flip(*args)
        return to_torch(y)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = to_torch(_apply_vjp(ctx.vjp, to_jax(grad_y)))
        return grad_x, None, None, None, None, None


def random_bitflip_fn(x: torch.Tensor, exp_halves: int | None, frac_halves: int | None, seed_exp: int, seed_frac: int,
                   zero_out_threshold: float | None) -> tuple[torch.Tensor, int, int]:
    """``mase_triton.random_bitflip.functional.random_bitflip_fn``'s signature and results:
    ``(y, next_seed_exp, next_seed_frac)``, differentiable in ``x``. Seeds must lie in
    ``[0, 2**31 - 8)``, jaxflip's contract (mase-triton wraps larger ones into 31 bits)."""
    for name, seed in (("seed_exp", seed_exp), ("seed_frac", seed_frac)):
        check_seed(name, seed)  # torch layers keep Python ints: no JAX scalars here
    if exp_halves is None and frac_halves is None and zero_out_threshold is None:
        return x, seed_exp, seed_frac
    y = RandomBitflipFunction.apply(x, exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold)
    return y, advance_seed(seed_exp, exp_halves), advance_seed(seed_frac, frac_halves)
