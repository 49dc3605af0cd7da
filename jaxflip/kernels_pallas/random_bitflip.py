"""``random_bitflip``: mase-triton's random bit flip, bit for bit, as a differentiable JAX op.

Contract (``SPEC.md``): flip each sign/exponent bit with probability ``0.5 ** exp_halves`` and
each fraction bit with ``0.5 ** frac_halves``, keyed on the element's global row-major index
and the group's seed; optionally zero out ``|y| >= zero_out_threshold`` (NaN and inf too);
return the output and the advanced seeds. The gradient is straight-through, masked by the
zero-out.

The halves and the threshold are run-time data (``flip_with_setting``: one int32 setting
vector, ``jaxflip.kernels_pallas.limits.flip_setting``), as the seeds are: one compiled
program serves every flip setting of a shape and dtype. What is static is only what selects
the code: whether the op flips at all, whether it may zero out (then a gradient needs the
keep mask), the backend and the sharding.

``exact=False`` draws the same fault distribution from a cheaper generator instead of
mase-triton's Philox stream (``jaxflip.kernels_pallas.sampled``): XLA elementwise code on
every backend, the same groups, seeds, zero-out and gradient.

Backends: ``"pallas"`` (GPU kernel), ``"interpret"`` (the same kernel in Pallas interpret
mode), ``"jnp"`` (XLA elementwise code). ``None`` picks ``pallas`` on GPU and ``jnp``
elsewhere; the environment variable ``JAXFLIP_BITFLIP_BACKEND`` overrides the default. All
three call the same Philox and mask code (``philox.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from jaxflip.kernels_pallas.kernel import bitflip_pallas, kernel_scalars
from jaxflip.kernels_pallas.layout import (
    Segments,
    nd_global_index,
    row_major_strides,
    shard_segments,
)
from jaxflip.kernels_pallas.limits import (EXP_HALVES, FRAC_HALVES, SEED_LIMIT, SETTING_SIZE, THRESHOLD_BITS,
                                           ZERO_OUT, check_seed, flip_setting)
from jaxflip.kernels_pallas.philox import BITS_DTYPE, flip_bits, setting_keep
from jaxflip.kernels_pallas.sampled import sampled_flip_bits

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("pallas", "interpret", "jnp")
# checkpoint names of a differentiated flip's output and int8 keep mask: a remat policy that
# saves both (jaxflip.models.llama's "flips") leaves no Philox to rerun in the recomputation
FLIPPED_NAME = "bitflip_flipped"
KEEP_NAME = "bitflip_keep"


def _is_python_seed(seed) -> bool:
    return isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)


def _check_seed_or_scalar(name: str, seed) -> None:
    """A Python int in the contract's range, or a JAX integer scalar; else a one-line error."""
    if _is_python_seed(seed):
        check_seed(name, seed)
        return
    dtype = getattr(seed, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or getattr(seed, "ndim", 0) != 0:
        raise TypeError(f"{name} must be an int or a JAX integer scalar, got {seed!r}")
    # a concrete JAX scalar is held to the same range (a traced one cannot be read): out of it,
    # it would wrap to another seed as uint32
    if not isinstance(seed, jax.core.Tracer):
        check_seed(name, int(seed))


def advance_seed(seed, halves):
    """The seed after one call when the group flipped: ``(seed + ceil(halves / 4)) % SEED_LIMIT``,
    of the same kind (a Python int, a JAX scalar of the same dtype, or a torch ``SymInt`` of
    the torch bridge under ``torch.compile``). ``halves``: an int, None (off), or a run-time
    int32 scalar (0: off; the result is then a JAX scalar). Seeds thus stay in the contract's
    range call after call, wrapping around to 0; mase-triton's wrap at ``2**31`` instead, so
    the two streams part only once a seed comes within 6 of ``2**31 - 8``."""
    if halves is None:
        return seed
    if isinstance(halves, jax.Array):
        seed = jnp.asarray(seed)
        step = ((halves + 3) // 4).astype(seed.dtype)
        return (seed + step) % jnp.asarray(SEED_LIMIT, seed.dtype)
    step = math.ceil(halves / 4)
    if isinstance(seed, jax.Array):
        return (seed + jnp.asarray(step, seed.dtype)) % jnp.asarray(SEED_LIMIT, seed.dtype)
    return ((int(seed) if _is_python_seed(seed) else seed) + step) % SEED_LIMIT


def _default_backend(x) -> str:
    forced = os.environ.get("JAXFLIP_BITFLIP_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"JAXFLIP_BITFLIP_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    devices = x.devices() if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else None
    platform = next(iter(devices)).platform if devices else jax.default_backend()
    return "pallas" if platform == "gpu" else "jnp"


@dataclass(frozen=True)
class FlipConfig:
    """Everything static about one flip: it selects the compiled code. ``flips``: the op may
    flip bits (False: zero-out only); ``zero_out``: it may zero out (the setting says whether
    it does); ``exact``: mase-triton's Philox stream (False: the sampled generator, the same
    distribution)."""

    flips: bool
    zero_out: bool
    backend: str
    sharding: NamedSharding | None = None
    exact: bool = True


def random_bitflip(
    x,
    exp_halves: int | None,
    frac_halves: int | None,
    seed_exp,
    seed_frac,
    zero_out_threshold: float | None = None,
    *,
    backend: str | None = None,
    sharding: NamedSharding | None = None,
    exact: bool = True,
):
    """Flip random bits of ``x``; returns ``(y, next_seed_exp, next_seed_frac)``.

    Same semantics as ``mase_triton.random_bitflip.functional.random_bitflip_fn`` on any
    shape (element index = row-major position), for float32, float16 and bfloat16, with
    either group allowed to be None. Seeds are Python ints (0 <= seed < 2**31 - 8) or JAX
    integer scalars (traced under ``jit``); the returned seeds are of the same kind and
    advance by ``ceil(halves / 4)`` for each group that flipped, modulo ``2**31 - 8``
    (``advance_seed``). The halves and threshold become the run-time setting of
    ``flip_with_setting``: called eagerly, one compiled program per shape and dtype serves
    every halves and threshold.

    ``sharding``: the ``NamedSharding`` of ``x`` (its mesh concrete, or the abstract mesh of
    ``jax.set_mesh`` inside ``jit``) so that each device's Pallas kernel flips its own shard
    with its global indices, under ``shard_map``. A concrete sharded ``jax.Array`` brings its
    own sharding. The ``jnp`` backend needs neither: XLA partitions its elementwise code.

    ``exact=False``: each bit flips with the same probability, independently, drawn by the
    sampled generator (``jaxflip.kernels_pallas.sampled``) rather than mase-triton's stream;
    the seeds advance as in exact mode, so successive calls differ.
    """
    setting = flip_setting(exp_halves, frac_halves, zero_out_threshold)
    if exp_halves is None and frac_halves is None and zero_out_threshold is None:
        _check_input(x, seed_exp, seed_frac, backend)
        return x, seed_exp, seed_frac
    y = _flip_setting(x, jnp.asarray(setting), seed_exp, seed_frac,
                      exp_halves is not None or frac_halves is not None, zero_out_threshold is not None, backend, sharding,
                      exact)
    return y, advance_seed(seed_exp, exp_halves), advance_seed(seed_frac, frac_halves)


def _check_input(x, seed_exp, seed_frac, backend) -> str:
    """The backend, after checking ``x``'s dtype and size and the seeds (one-line errors)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        raise TypeError(f"random_bitflip: unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    _check_seed_or_scalar("seed_exp", seed_exp)
    _check_seed_or_scalar("seed_frac", seed_frac)
    if math.prod(x.shape) >= 2**32:
        raise ValueError(f"random_bitflip: {math.prod(x.shape)} elements exceed the 2**32 Philox counters")
    backend = backend or _default_backend(x)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def flip_with_setting(x, setting, seed_exp, seed_frac, *, flips: bool = True, zero_out: bool = True,
                      backend: str | None = None, sharding: NamedSharding | None = None, exact: bool = True):
    """``random_bitflip`` with its halves and threshold as a setting vector (int32, of
    ``jaxflip.kernels_pallas.limits.flip_setting``; a host array or a run-time value):
    returns ``(y, next_seed_exp, next_seed_frac)``, the seeds as JAX scalars.

    ``flips`` and ``zero_out`` are static: what the compiled code can do (False: it never
    flips / never zeroes out, and the setting's halves / zero-out flag must say so). Within
    that, every setting runs the same program; a setting that flips nothing runs no Philox.
    ``exact``: static too, as in ``random_bitflip``.
    """
    setting = jnp.asarray(setting, jnp.int32)
    if setting.shape != (SETTING_SIZE,):
        raise ValueError(f"flip setting must be an int32 vector of {SETTING_SIZE}, got shape {setting.shape}")
    y = _flip_setting(x, setting, seed_exp, seed_frac, flips, zero_out, backend, sharding, exact)
    if not flips:
        return y, seed_exp, seed_frac
    return y, advance_seed(seed_exp, setting[EXP_HALVES]), advance_seed(seed_frac, setting[FRAC_HALVES])


def _flip_setting(x, setting, seed_exp, seed_frac, flips: bool, zero_out: bool, backend: str | None,
                  sharding: NamedSharding | None, exact: bool = True):
    """``y`` of ``flip_with_setting``; ``setting`` an int32 JAX array of ``SETTING_SIZE``."""
    backend = _check_input(x, seed_exp, seed_frac, backend)
    if not (flips or zero_out):
        return x
    if sharding is None and backend != "jnp" and isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh.size > 1:
            sharding = x.sharding
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True or False, got {exact!r}")
    # sampled flips are XLA elementwise code on every backend: XLA partitions them itself
    config = FlipConfig(flips, zero_out, backend, sharding if backend != "jnp" and exact else None, exact)
    seeds = jnp.stack([jnp.asarray(seed_exp).astype(jnp.uint32), jnp.asarray(seed_frac).astype(jnp.uint32)])
    # called eagerly (outside jit), the op would run primitive by primitive, each materializing
    # a full-size array: one compiled function per configuration instead
    return (_flip if isinstance(x, jax.core.Tracer) else _flip_compiled)(x, setting, seeds, config)


def _flip_forward(x, setting, seeds, config: FlipConfig, with_keep: bool):
    """``(y, keep)``; keep is None without zero-out, or where no gradient needs it
    (``with_keep`` False: the kernel then writes no mask)."""
    with_keep = with_keep and config.zero_out
    if x.size == 0:
        return x, (jnp.ones(x.shape, jnp.int8) if with_keep else None)
    if config.backend == "jnp" or not (config.flips and config.exact):
        y, keep = _flip_jnp(x, setting, seeds, config)
        return y, (keep if with_keep else None)
    if config.sharding is not None and config.sharding.mesh.size > 1:
        return _flip_pallas_sharded(x, setting, seeds, config, with_keep)
    return _flip_pallas_local(x, setting, seeds, jnp.uint32(0), ((x.size, 1),), config, with_keep)


def _flip_jnp(x, setting, seeds, config: FlipConfig):
    """The XLA elementwise form (also the zero-out of an op that never flips, and every
    sampled flip)."""
    dtype_name = jnp.dtype(x.dtype).name
    bits = jax.lax.bitcast_convert_type(x, BITS_DTYPE[dtype_name])
    if config.flips:
        flip = flip_bits if config.exact else sampled_flip_bits
        bits = flip(bits, nd_global_index(x.shape), seeds[0], seeds[1], setting[EXP_HALVES], setting[FRAC_HALVES],
                    dtype_name)
    if not config.zero_out:
        return jax.lax.bitcast_convert_type(bits, x.dtype), None
    keep = setting_keep(bits, dtype_name, setting[ZERO_OUT], setting[THRESHOLD_BITS])
    y = jax.lax.bitcast_convert_type(jnp.where(keep, bits, jnp.zeros_like(bits)), x.dtype)
    return y, keep.astype(jnp.int8)


def _flip_pallas_local(x, setting, seeds, base, segments: Segments, config: FlipConfig, with_keep: bool):
    y, keep = bitflip_pallas(
        x.reshape(-1), kernel_scalars(seeds[0], seeds[1], base, setting), segments=segments, zero_out=config.zero_out,
        interpret=config.backend == "interpret", with_keep=with_keep,
    )
    return y.reshape(x.shape), None if keep is None else keep.reshape(x.shape)


def _flip_pallas_sharded(x, setting, seeds, config: FlipConfig, with_keep: bool):
    """Each device runs the kernel on its shard with the shard's global indices."""
    mesh = config.sharding.mesh
    spec = tuple(config.sharding.spec) + (None,) * (x.ndim - len(config.sharding.spec))
    dim_axes = [() if s is None else ((s,) if isinstance(s, str) else tuple(s)) for s in spec]
    shards = [math.prod(mesh.shape[a] for a in axes) for axes in dim_axes]
    if any(size % n for size, n in zip(x.shape, shards)):
        raise ValueError(f"random_bitflip: shape {x.shape} does not divide evenly over sharding {spec}")
    local_shape = tuple(size // n for size, n in zip(x.shape, shards))
    segments = shard_segments(x.shape, local_shape)
    strides = row_major_strides(x.shape)
    pspec = PartitionSpec(*spec)

    def per_shard(x_local, setting, seeds):
        base = jnp.uint32(0)
        for axes, local, stride in zip(dim_axes, local_shape, strides):
            if not axes:
                continue
            shard = jnp.uint32(0)
            for axis in axes:
                shard = shard * jnp.uint32(mesh.shape[axis]) + jax.lax.axis_index(axis).astype(jnp.uint32)
            base = base + shard * jnp.uint32(local * stride)
        y, keep = _flip_pallas_local(x_local, setting, seeds, base, segments, config, with_keep)
        return (y, keep) if with_keep else (y,)

    out_specs = (pspec, pspec) if with_keep else (pspec,)
    outs = jax.shard_map(per_shard, mesh=mesh, in_specs=(pspec, PartitionSpec(), PartitionSpec()),
                         out_specs=out_specs, check_vma=False)(x, setting, seeds)
    return outs[0], (outs[1] if with_keep else None)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flip(x, setting, seeds, config: FlipConfig):
    return _flip_forward(x, setting, seeds, config, with_keep=False)[0]


def _flip_fwd(x, setting, seeds, config: FlipConfig):
    y, keep = _flip_forward(x, setting, seeds, config, with_keep=True)
    return checkpoint_name(y, FLIPPED_NAME), (None if keep is None else checkpoint_name(keep, KEEP_NAME))


def _flip_bwd(config: FlipConfig, keep, grad_y):
    if keep is None:
        return grad_y, None, None
    return jnp.where(keep != 0, grad_y, jnp.zeros_like(grad_y)), None, None


_flip.defvjp(_flip_fwd, _flip_bwd)


_flip_compiled = jax.jit(_flip, static_argnums=3)  # compiled once per FlipConfig, shape and dtype: not per setting
