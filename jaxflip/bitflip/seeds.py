"""Bitflip seeds and flip settings as explicit NNX state.

Both are ``BitflipState``: run-time arguments of every compiled forward and training step,
never parameters. ``FlipSetting`` holds one tensor's halves and zero-out threshold
(``jaxflip.kernels_pallas.limits.flip_setting``), so changing them compiles nothing;
``BitflipSeed`` holds one Philox seed.

Each flipped tensor has two Philox seeds (one for the sign/exponent bits, one for the fraction
bits). mase-triton keeps them as Python ints on the layer and advances them after every call;
here they are int32 scalars in a dedicated ``nnx.Variable`` type, so that

* ``nnx.jit`` carries them through compiled calls and writes the advanced values back,
* optimizers never see them (they are not ``nnx.Param``),
* ``nnx.state(model, BitflipSeed)`` reads them all as one pytree (to checkpoint) and
  ``nnx.update(model, seeds)`` restores them. ``nnx.state`` hands out the model's live
  Variables, which later calls keep advancing; ``seed_snapshot`` copies them.

Two ways to choose the starting seeds (``apply_bitflip_rules``'s ``seed_mode``):

* ``"reference"``: the seeds written in the rule (default 0), as mase-triton and
  NewComputeBench do. Every layer then starts at seed 0, so layers of the same shape flip the
  same positions.
* ``"independent"``: a hash of (base seed, layer name, seed name), in ``[0, 2**30)``. A group
  advances by at most 6 per call (``ceil(24 / 4)``) and the kernel accepts seeds below
  ``2**31 - 8``, so every stream has room for more than 1.7e8 calls before it wraps around
  to 0 (``advance_seed``). Streams are not guaranteed disjoint: two layers' seed ranges can overlap
  after many calls, and then one layer replays the other's flip positions from an earlier
  call (never in the same call unless their starting seeds collide, which has probability
  about 1e-9 per pair).
"""

from __future__ import annotations

import hashlib

import jax
from flax import nnx

SEED_NAMES = ("x_seed_exp", "x_seed_frac", "w_seed_exp", "w_seed_frac")
INDEPENDENT_SEED_RANGE = 2**30


class BitflipState(nnx.Variable):
    """The bitflip state of a Linear: its seeds and flip settings (neither is trained, and
    neither is in an HF or jaxflip checkpoint's weights)."""


class BitflipSeed(BitflipState):
    """An int32 scalar: the current Philox seed of one bit group of one flipped tensor."""


class FlipSetting(BitflipState):
    """An int32 vector: one tensor's run-time flip setting (halves of each group, zero-out
    flag and threshold bits; all zeros: off)."""


def seed_snapshot(model: nnx.Module) -> nnx.State:
    """The model's current seeds, detached from it: ``nnx.update(model, snapshot)`` later
    rewinds the flips to this point."""
    return jax.tree.map(lambda seed: seed, nnx.state(model, BitflipSeed))


def independent_seed(base_seed: int, layer_name: str, seed_name: str) -> int:
    """A starting seed in ``[0, 2**30)`` that depends only on its arguments (stable across runs
    and machines, unlike Python's ``hash``)."""
    digest = hashlib.sha256(f"{base_seed}/{layer_name}/{seed_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % INDEPENDENT_SEED_RANGE
