"""The Pallas kernel: one program flips one block of the (flattened, local) array.

On GPU it lowers through Triton; Pallas's Triton lowering has no rule for ``lax.mulhi``, so
the high word of each Philox product comes from PTX ``mul.hi.u32`` (as in Triton's own
``umulhi``, which mase-triton's kernel uses).
In interpret mode (CPU) the same kernel body runs with the portable 16-bit-split multiply.
Halves, dtype and threshold are compile-time constants, so each configuration gets
straight-line code with no unused Philox call; with early exit each block skips a group's
remaining Philox calls once none of its masked bits survives (``philox.group_flip_word``),
which changes the work, never the bits.

The launch (elements per block, warps per block, early exit) is chosen by the halves
(:func:`default_launch`) and can be set per process with ``JAXFLIP_BITFLIP_LAUNCH=BLOCK/WARPS``
(e.g. ``32/1``) and ``JAXFLIP_BITFLIP_EARLY_EXIT=0|1``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxflip.kernels_pallas.layout import Segments, segments_global_index
from jaxflip.kernels_pallas.philox import BITS_DTYPE, flip_bits, mulhilo_16bit_split, philox_calls, zero_out_keep

@dataclass(frozen=True)
class Launch:
    """How the kernel is launched: ``block`` elements per program (a power of two >= 16),
    ``num_warps`` warps per program (GPU only), ``early_exit`` per block (bit-identical)."""

    block: int
    num_warps: int
    early_exit: bool = True

    def __post_init__(self):
        if not (isinstance(self.block, int) and self.block >= 16 and self.block & (self.block - 1) == 0):
            raise ValueError(f"Launch.block must be a power of two >= 16, got {self.block!r}")
        if not (isinstance(self.num_warps, int) and self.num_warps >= 1 and self.num_warps & (self.num_warps - 1) == 0):
            raise ValueError(f"Launch.num_warps must be a power of two >= 1, got {self.num_warps!r}")


# Two launches, chosen by the most Philox calls a group needs (``ceil(halves / 4)``), measured
# on an H200 (benchmarks/NOTES.md, "Kernel early exit", bf16, 2**27 elements, zero-out):
# - few calls (halves <= 12): 256 elements / 8 warps, one element per thread, no early exit.
#   32-element blocks cost ~3 ms at any halves (4M programs), and with one or two calls there
#   is little to skip: at halves 8 the exit test made 256/8 slower (2.19 vs 1.98 ms).
# - four or more calls (halves >= 13): 32 / 1 with early exit, where a warp-sized block most
#   often clears all its masked bits early: halves 16 3.06-3.40 ms, halves 24 4.07-4.13 ms,
#   against 4.30 / 7.76 ms at 256/8 without exit (mase-triton: 4.21 / 8.54).
FEW_CALLS_LAUNCH = Launch(block=256, num_warps=8, early_exit=False)
MANY_CALLS_LAUNCH = Launch(block=32, num_warps=1, early_exit=True)
MANY_CALLS = 4


@functools.cache
def default_launch(halves: int = 1, interpret: bool = False) -> Launch:
    """The launch for groups of at most ``halves`` (the larger of the two groups'), with the
    environment's overrides (read once per process). In interpret mode (CPU) the block stays
    at 256, where the interpreter runs fastest; early exit follows the rule, as on a GPU."""
    launch = MANY_CALLS_LAUNCH if philox_calls(halves) >= MANY_CALLS else FEW_CALLS_LAUNCH
    if interpret:
        launch = Launch(FEW_CALLS_LAUNCH.block, FEW_CALLS_LAUNCH.num_warps, launch.early_exit)
    text = os.environ.get("JAXFLIP_BITFLIP_LAUNCH")
    if text:
        block, sep, warps = text.partition("/")
        if not (sep and block.isdigit() and warps.isdigit()):
            raise ValueError(f"JAXFLIP_BITFLIP_LAUNCH must be BLOCK/WARPS, e.g. 32/1, got {text!r}")
        launch = Launch(int(block), int(warps), launch.early_exit)
    early_exit = os.environ.get("JAXFLIP_BITFLIP_EARLY_EXIT")
    if early_exit:
        if early_exit not in ("0", "1"):
            raise ValueError(f"JAXFLIP_BITFLIP_EARLY_EXIT must be 0 or 1, got {early_exit!r}")
        launch = Launch(launch.block, launch.num_warps, early_exit == "1")
    return launch


def ptx_mulhilo(a: int, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """High and low words of the constant ``a`` times uint32 ``b``, the high one by PTX
    ``mul.hi.u32`` (operands as int32: the lowering asserts on unsigned types; one asm with
    both words as results trips Pallas's lowering, "2 outvars do not match 1 outvals")."""
    [hi] = plgpu.elementwise_inline_asm(
        "mul.hi.u32 $0, $1, $2;",
        args=[lax.bitcast_convert_type(jnp.full_like(b, a), jnp.int32), lax.bitcast_convert_type(b, jnp.int32)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(b.shape, jnp.int32)],
    )
    return lax.bitcast_convert_type(hi, jnp.uint32), jnp.uint32(a) * b


def _bitflip_kernel(
    scalars_ref, x_ref, *out_refs, n, block, segments, exp_halves, frac_halves,
    dtype_name, threshold, interpret, early_exit,
):
    local = pl.program_id(0) * block + lax.iota(jnp.int32, block)
    in_bounds = local < n
    index = segments_global_index(local.astype(jnp.uint32), segments, scalars_ref[2])
    bits = x_ref[...] if interpret else plgpu.load(x_ref, mask=in_bounds, other=0)
    bits = flip_bits(
        bits, index, scalars_ref[0], scalars_ref[1], exp_halves, frac_halves, dtype_name,
        mulhilo=mulhilo_16bit_split if interpret else ptx_mulhilo, early_exit=early_exit,
    )
    outs = [bits]
    if threshold is not None:
        keep = zero_out_keep(bits, dtype_name, threshold)
        outs = [jnp.where(keep, bits, jnp.zeros_like(bits)), keep.astype(jnp.int8)]
    for ref, value in zip(out_refs, outs):
        if interpret:
            ref[...] = value
        else:
            plgpu.store(ref, value, mask=in_bounds)


def bitflip_pallas(
    x_flat: jnp.ndarray,
    scalars: jnp.ndarray,
    *,
    segments: Segments,
    exp_halves: int | None,
    frac_halves: int | None,
    threshold: float | None,
    interpret: bool,
    launch: Launch | None = None,
):
    """Flip a flat array. ``scalars`` is uint32 ``[seed_exp, seed_frac, base, 0]``.

    Returns ``y`` and, when ``threshold`` is set, the int8 keep mask (``|y| < threshold``
    before zero-out), which is the backward pass's exact residual. The kernel reads and
    writes bit patterns, never floats, so NaN payloads pass through untouched as in
    mase-triton (XLA on CPU would canonicalize them in a bfloat16 store). ``launch``:
    :func:`default_launch` when None.
    """
    return _bitflip_pallas(
        x_flat, scalars, segments=segments, exp_halves=exp_halves, frac_halves=frac_halves,
        threshold=threshold, interpret=interpret,
        launch=launch or default_launch(max(exp_halves or 0, frac_halves or 0), interpret),
    )


@functools.partial(
    jax.jit, static_argnames=("segments", "exp_halves", "frac_halves", "threshold", "interpret", "launch"),
)
def _bitflip_pallas(x_flat, scalars, *, segments, exp_halves, frac_halves, threshold, interpret, launch: Launch):
    (n,) = x_flat.shape
    dtype_name = jnp.dtype(x_flat.dtype).name
    x_bits = lax.bitcast_convert_type(x_flat, BITS_DTYPE[dtype_name])
    block = min(launch.block, max(16, pl.next_power_of_2(n)))
    out_shape = [jax.ShapeDtypeStruct((n,), x_bits.dtype)]
    if threshold is not None:
        out_shape.append(jax.ShapeDtypeStruct((n,), jnp.int8))
    kernel = functools.partial(
        _bitflip_kernel, n=n, block=block, segments=segments, exp_halves=exp_halves,
        frac_halves=frac_halves, dtype_name=dtype_name, threshold=threshold, interpret=interpret,
        early_exit=launch.early_exit,
    )
    block_spec = pl.BlockSpec((block,), lambda i: (i,))
    compiler_params = None if interpret else plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=1)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((4,), lambda i: (0,)), block_spec],
        out_specs=[block_spec] * len(out_shape),
        interpret=interpret,
        compiler_params=compiler_params,
        name="jaxflip_random_bitflip",
    )(scalars, x_bits)
    y = lax.bitcast_convert_type(outs[0], x_flat.dtype)
    return y, (outs[1] if threshold is not None else None)
