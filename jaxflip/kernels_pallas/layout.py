"""Global element indices: element ``i`` of the row-major global array uses Philox counter ``i``.

Two forms of the same rule. :func:`nd_global_index` builds the index of a whole array from
per-dimension iotas, which XLA's SPMD partitioner splits across devices without gathering.
:func:`segments_global_index` maps the flat position of an element inside one shard (what a
Pallas kernel sees) to its global index, given the shard's :func:`shard_segments`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
from jax import lax

Segments = tuple[tuple[int, int], ...]


def row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def nd_global_index(shape: Sequence[int]) -> jnp.ndarray:
    """uint32 array of ``shape`` holding each element's row-major position."""
    index = jnp.zeros(shape, jnp.uint32)
    for dim, stride in enumerate(row_major_strides(shape)):
        index = index + lax.broadcasted_iota(jnp.uint32, tuple(shape), dim) * jnp.uint32(stride)
    return index


def shard_segments(global_shape: Sequence[int], local_shape: Sequence[int]) -> Segments:
    """Describe a shard's elements as nested runs ``(local_size, global_stride)``, outer first.

    Adjacent dimensions whose local elements are contiguous in the global array merge into
    one run, so an unsharded array, or one sharded only on its leading dimension, is a single
    run ``((n, 1),)`` and the kernel adds no index arithmetic.
    """
    runs: list[list[int]] = []
    for size, stride in reversed(list(zip(local_shape, row_major_strides(global_shape)))):
        if size == 1:
            continue
        if runs and runs[-1][0] * runs[-1][1] == stride:
            runs[-1][0] *= size
        else:
            runs.append([size, stride])
    return tuple((size, stride) for size, stride in reversed(runs)) or ((1, 1),)


def segments_global_index(local: jnp.ndarray, segments: Segments, base) -> jnp.ndarray:
    """Global index of the elements at flat positions ``local`` (uint32) of a shard.

    ``base`` is the global index of the shard's first element.
    """
    index = None
    inner = math.prod(size for size, _ in segments)
    for k, (size, stride) in enumerate(segments):
        inner //= size
        coord = local if inner == 1 else local // jnp.uint32(inner)
        if k > 0:
            coord = coord % jnp.uint32(size)
        term = coord if stride == 1 else coord * jnp.uint32(stride)
        index = term if index is None else index + term
    return index + base
