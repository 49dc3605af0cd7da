"""``random_bitflip_fn`` on torch tensors (mase-triton's name; ``jaxflip.random_bitflip`` is the JAX op): jaxflip's op run by JAX on the tensor's own memory.

Tensors cross between torch and JAX through DLPack, which shares the buffer (no copy on GPU
or CPU), so a torch model gets jaxflip's flips, bit for bit the flips of mase-triton's
``random_bitflip_fn``, wherever JAX can run on the tensor's device.

The flip and its gradient are ``torch.library`` custom ops (``jaxflip::random_bitflip`` and
``jaxflip::random_bitflip_backward``) with fake implementations, as mase-triton's are: meta
tensors (a model built on the meta device) and ``torch.compile`` trace through them. The
gradient is straight-through, masked by the zero-out: like mase-triton, the backward keeps the
input and recomputes the flips to find the mask, so an input changed in place between forward
and backward is an error (torch's saved-tensor version check), not a wrong gradient.
"""

from __future__ import annotations

from functools import partial

import jax
import torch

from jaxflip.kernels_pallas import random_bitflip as jax_random_bitflip
from jaxflip.kernels_pallas.limits import check_halves, check_seed, check_threshold
from jaxflip.kernels_pallas.random_bitflip import advance_seed

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """The tensor's memory as a JAX array, row-major (the element order the flips key on)."""
    return jax.dlpack.from_dlpack(tensor.detach().contiguous())


def to_torch(array: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(array)


@partial(jax.jit, static_argnums=(1, 2, 5, 6))
def _flip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold, exact):
    """The seeds are traced, so one compilation serves every call."""
    return jax_random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold, exact=exact)[0]


@partial(jax.jit, static_argnums=(2, 3, 6, 7))
def _flip_grad(x, grad_y, exp_halves, frac_halves, seed_exp, seed_frac, threshold, exact):
    """``dx``: ``grad_y`` through the op's own VJP (its zero-out mask, recomputed from ``x``)."""
    _, vjp = jax.vjp(lambda x: jax_random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold,
                                                  exact=exact)[0], x)
    return vjp(grad_y)[0]


@torch.library.custom_op("jaxflip::random_bitflip", mutates_args=())
def _flip_op(x: torch.Tensor, exp_halves: int | None, frac_halves: int | None, seed_exp: int, seed_frac: int,
             zero_out_threshold: float | None, exact: bool) -> torch.Tensor:
    return to_torch(_flip(to_jax(x), exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold, exact))


@_flip_op.register_fake
def _flip_op_fake(x, exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold, exact):
    return x.new_empty(x.shape)  # row-major, as DLPack hands JAX's output back


@torch.library.custom_op("jaxflip::random_bitflip_backward", mutates_args=())
def _flip_backward_op(x: torch.Tensor, grad_y: torch.Tensor, exp_halves: int | None, frac_halves: int | None,
                      seed_exp: int, seed_frac: int, zero_out_threshold: float, exact: bool) -> torch.Tensor:
    return to_torch(_flip_grad(to_jax(x), to_jax(grad_y), exp_halves, frac_halves, seed_exp, seed_frac,
                               zero_out_threshold, exact))


@_flip_backward_op.register_fake
def _flip_backward_op_fake(x, grad_y, exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold, exact):
    return grad_y.new_empty(grad_y.shape)


def _save_for_backward(ctx, inputs, output):
    x, *ctx.settings = inputs
    if ctx.settings[-2] is not None:  # the zero-out mask depends on x; without one, dx = dy
        ctx.save_for_backward(x)


def _backward(ctx, grad_y):
    grad_x = grad_y if ctx.settings[-2] is None else _flip_backward_op(*ctx.saved_tensors, grad_y, *ctx.settings)
    return grad_x, None, None, None, None, None, None


_flip_op.register_autograd(_backward, setup_context=_save_for_backward)


def random_bitflip_fn(x: torch.Tensor, exp_halves: int | None, frac_halves: int | None, seed_exp: int, seed_frac: int,
                      zero_out_threshold: float | None, *, exact: bool = True) -> tuple[torch.Tensor, int, int]:
    """``mase_triton.random_bitflip.functional.random_bitflip_fn``'s signature and results:
    ``(y, next_seed_exp, next_seed_frac)``, differentiable in ``x``; ``y`` is a new tensor
    (a copy when nothing is flipped or zeroed). Seeds must lie in ``[0, 2**31 - 8)``, and the
    next seeds wrap around within it (``advance_seed``), as in the JAX op and its layers.
    ``exact=False``: the sampled flips of ``jaxflip.random_bitflip(..., exact=False)``."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"random_bitflip_fn: unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")
    if x.layout != torch.strided:  # DLPack hands JAX dense memory only
        raise TypeError(f"random_bitflip_fn: unsupported layout {x.layout}; expected a dense tensor (.to_dense())")
    check_halves("exp_halves", exp_halves)
    check_halves("frac_halves", frac_halves)
    zero_out_threshold = check_threshold(zero_out_threshold)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False, got {exact!r}")
    for name, seed in (("seed_exp", seed_exp), ("seed_frac", seed_frac)):
        if not isinstance(seed, torch.SymInt):  # under torch.compile the op checks it when it runs
            check_seed(name, seed)
    if exp_halves is None and frac_halves is None:
        # mase-triton's own torch code here (its comparison casts the threshold to x's dtype)
        y = x.clone() if zero_out_threshold is None else torch.where(x.abs() < zero_out_threshold, x, 0.0)
        return y, seed_exp, seed_frac
    y = _flip_op(x, exp_halves, frac_halves, seed_exp, seed_frac, zero_out_threshold, exact)
    return y, advance_seed(seed_exp, exp_halves), advance_seed(seed_frac, frac_halves)
