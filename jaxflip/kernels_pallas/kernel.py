"""The Pallas kernel: one program flips one block of the (flattened, local) array.

On GPU it lowers through Triton; Pallas's Triton lowering has no rule for ``lax.mulhi``, so
the high word of each Philox product comes from PTX ``mul.hi.u32`` (as in Triton's own
``umulhi``, which mase-triton's kernel uses).
In interpret mode (CPU) the same kernel body runs with the portable 16-bit-split multiply.
The dtype, the launch and whether the kernel may zero out are compile-time constants; the
seeds, the halves of each group (0: off) and the zero-out threshold are run-time scalars, so
one compiled kernel serves every flip setting. The Philox round count (10, 12 or 16, by
halves) is a branch uniform over the program, as is the number of words a first call ANDs
(1-4): each branch is the static code of its case, so run-time halves cost no more Philox
work than compile-time ones did (benchmarks/NOTES.md, issue 25). Each
element runs a group's Philox calls only while a masked bit of its own survives (the
``per_element`` mode, ``_flip_per_element``), and when the two seeds are equal (the
reference's seeds always are) both groups take their bits from one Philox stream. Neither
changes a bit, only the work.

The launch (elements and warps per program, mode) is :data:`DEFAULT_LAUNCH`; it can be set
per process with ``JAXFLIP_BITFLIP_LAUNCH=BLOCK/WARPS`` and ``JAXFLIP_BITFLIP_MODE=dense|per_element``.
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
from jaxflip.kernels_pallas.limits import EXP_HALVES, FRAC_HALVES, SETTING_SIZE, THRESHOLD_BITS, ZERO_OUT
from jaxflip.kernels_pallas.philox import (
    BITS_DTYPE,
    ROUND_COUNTS,
    and_call_words,
    flip_groups,
    group_flip_word,
    mulhilo_16bit_split,
    philox4x32,
    philox4x32_after,
    philox_calls,
    rounds_index,
    setting_keep,
)

# the kernel's scalar operand, uint32: the two seeds, the shard's first global index, then
# the run-time setting (jaxflip.kernels_pallas.limits: halves, zero-out flag, threshold bits)
SEED_EXP, SEED_FRAC, BASE, SETTING = 0, 1, 2, 3
N_SCALARS = SETTING + SETTING_SIZE


def kernel_scalars(seed_exp, seed_frac, base, setting) -> jnp.ndarray:
    """The kernel's scalar operand of these seeds, first global index and setting vector."""
    head = jnp.stack([jnp.asarray(v).astype(jnp.uint32) for v in (seed_exp, seed_frac, base)])
    return jnp.concatenate([head, jnp.asarray(setting).astype(jnp.uint32)])

MODES = ("dense", "per_element")


@dataclass(frozen=True)
class Launch:
    """How the kernel is launched: ``block`` elements per program (a power of two >= 16),
    ``num_warps`` warps per program (GPU only) and the ``mode`` of its Philox loop:

    * ``"dense"``: every element computes every Philox call of its groups, one element per
      thread (the plain form, for reference and comparison);
    * ``"per_element"``: each element continues only while its own masked bits survive. A
      program is ``32 * num_warps`` lanes over ``block / lanes`` slots (at most 16): first
      every element's first call of each group (dense, no bookkeeping), then each lane works
      through its own queue of the elements and groups still alive, one Philox call per
      iteration, until every lane's queue is empty (``_flip_per_element``).

    Both give the same bits; only the work differs. (A third mode, skipping a group's
    remaining calls once no masked bit of a whole 32-element block survived, was slower at
    every halves than ``per_element``: benchmarks/NOTES.md, issue 20.)"""

    block: int
    num_warps: int
    mode: str = "dense"

    def __post_init__(self):
        if not (isinstance(self.block, int) and self.block >= 16 and self.block & (self.block - 1) == 0):
            raise ValueError(f"Launch.block must be a power of two >= 16, got {self.block!r}")
        if not (isinstance(self.num_warps, int) and self.num_warps >= 1 and self.num_warps & (self.num_warps - 1) == 0):
            raise ValueError(f"Launch.num_warps must be a power of two >= 1, got {self.num_warps!r}")
        if self.mode not in MODES:
            raise ValueError(f"Launch.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "per_element" and not self.lanes <= self.block <= MAX_SLOTS * self.lanes:
            raise ValueError(f"Launch.block must be 1 to {MAX_SLOTS} times 32 * num_warps in per_element mode, "
                             f"got {self.block}/{self.num_warps}")

    @property
    def lanes(self) -> int:
        """Elements a program works on at a time in ``per_element`` mode: one per thread."""
        return 32 * self.num_warps


# per_element keeps a lane's pending slots as the bits of one uint32 per group
MAX_SLOTS = 32

# Measured on an H100 (benchmarks/NOTES.md, issue 20; bf16, 2**27 elements, unequal seeds):
# per-element blocks of one warp beat dense 256-element blocks of 8 warps at every halves
# measured (halves 4: 0.95 against 1.21 ms; 8: 1.90 / 1.88; 16: 2.23 / 3.82; 24: 2.76 / 7.29).
# With one Philox call per group there is no second phase; the first, a loop over a lane's
# slots, still runs faster than one element per thread. At halves 16, after the first call
# only 44% of bf16 exponent groups (9 bits) still have a live bit, 3.5% after two: per-element
# continuation needs ~1.48 calls per group where dense needs 4.
DEFAULT_LAUNCH = Launch(block=1024, num_warps=1, mode="per_element")


@functools.cache
def default_launch(interpret: bool = False) -> Launch:
    """The launch, with the environment's overrides (read once per process). In interpret
    mode (CPU) blocks stay at 256 elements, where the interpreter runs fastest."""
    launch = Launch(256, 1, DEFAULT_LAUNCH.mode) if interpret else DEFAULT_LAUNCH
    text = os.environ.get("JAXFLIP_BITFLIP_LAUNCH")
    mode = os.environ.get("JAXFLIP_BITFLIP_MODE") or launch.mode
    if mode not in MODES:
        raise ValueError(f"JAXFLIP_BITFLIP_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    if text:
        block, sep, warps = text.partition("/")
        if not (sep and block.isdigit() and warps.isdigit()):
            raise ValueError(f"JAXFLIP_BITFLIP_LAUNCH must be BLOCK/WARPS, e.g. 1024/1, got {text!r}")
        return Launch(int(block), int(warps), mode)
    return Launch(launch.block, launch.num_warps, mode)


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


def _load(ref, pos, mask):
    return plgpu.load(ref.at[pos], mask=mask, other=0)


def _store(ref, pos, value, mask):
    plgpu.store(ref.at[pos], value, mask=mask)


def _bitflip_kernel(scalars_ref, x_ref, y_ref, *keep_ref, n, block, segments, dtype_name, zero_out, interpret,
                    launch):
    seeds = (scalars_ref[SEED_EXP], scalars_ref[SEED_FRAC])
    exp_halves = scalars_ref[SETTING + EXP_HALVES].astype(jnp.int32)
    frac_halves = scalars_ref[SETTING + FRAC_HALVES].astype(jnp.int32)
    finish = functools.partial(_finish, dtype_name=dtype_name, zero_out=zero_out,
                               zero_out_flag=scalars_ref[SETTING + ZERO_OUT],
                               threshold_bits=scalars_ref[SETTING + THRESHOLD_BITS])
    # read outside the cond below: interpret mode substitutes program_id only at the top level
    first = pl.program_id(0) * block
    flip = functools.partial(
        _flip_per_element if launch.mode == "per_element" else _flip_block,
        seeds=seeds, base=scalars_ref[BASE], first=first, x_ref=x_ref, y_ref=y_ref,
        keep_ref=keep_ref[0] if keep_ref else None, n=n, block=block, segments=segments, finish=finish,
        mulhilo=mulhilo_16bit_split if interpret else ptx_mulhilo, launch=launch,
    )
    # equal seeds and halves (the reference's: every layer starts both seeds at 0) share every Philox call
    shared = (seeds[0] == seeds[1]) & (exp_halves == frac_halves) & (exp_halves > 0)
    lax.cond(shared, lambda: flip(flip_groups(exp_halves, frac_halves, dtype_name, shared_seed=True)),
             lambda: flip(flip_groups(exp_halves, frac_halves, dtype_name)))


def _finish(bits, *, dtype_name, zero_out, zero_out_flag, threshold_bits):
    """The output bits after zero-out, and the int8 keep mask (None when the kernel never
    zeroes out)."""
    if not zero_out:
        return bits, None
    keep = setting_keep(bits, dtype_name, zero_out_flag, threshold_bits)
    return jnp.where(keep, bits, jnp.zeros_like(bits)), keep.astype(jnp.int8)


def _flip_block(groups, *, seeds, base, first, x_ref, y_ref, keep_ref, n, block, segments, finish, mulhilo, launch):
    """Dense mode: the whole block's groups in one pass, one element per lane."""
    pos = lax.iota(jnp.int32, block)
    local = first + pos
    in_bounds = local < n
    index = segments_global_index(local.astype(jnp.uint32), segments, base)
    bits = _load(x_ref, pos, in_bounds)
    for group in groups:
        word = group_flip_word(index, seeds[group.seed], group.halves, group.mask, mulhilo)
        bits = bits ^ word.astype(bits.dtype)
    bits, keep = finish(bits)
    _store(y_ref, pos, bits, in_bounds)
    if keep_ref is not None:
        _store(keep_ref, pos, keep, in_bounds)


def _first_call_word(index, seed, halves, mask: int, mulhilo):
    """``mask`` AND the words of a group's first Philox call, ``min(halves, 4)`` of them; 0 for
    a group that is off. One branch per (round count, words) case, uniform over the program,
    so each is the static code (the words a case does not AND are dead code)."""
    u32 = jnp.uint32
    cases = [(ROUND_COUNTS[0], n_words) for n_words in (1, 2, 3)] + [(n_rounds, 4) for n_rounds in ROUND_COUNTS]

    def case(n_rounds, n_words):
        return lambda: and_call_words(u32(mask), philox4x32(index, seed, n_rounds, mulhilo), n_words)

    branch = jnp.where(halves == 0, 0, jnp.where(halves < 4, halves, 4 + rounds_index(halves)))
    return lax.switch(branch, [lambda: jnp.zeros(index.shape, u32)] + [case(*c) for c in cases])


def _flip_per_element(groups, *, seeds, base, first, x_ref, y_ref, keep_ref, n, block, segments, finish, mulhilo,
                      launch):
    """Per-element continuation (``Launch.mode == "per_element"``), bit-identical to dense.

    Phase 1, dense: slot by slot (two at a time, for instruction-level parallelism), every
    element's first Philox call of each group. An element whose groups are all settled (no
    masked bit left, or no call left) is written out; the others get their partial flip word
    written to ``y_ref`` as scratch, and each lane marks its unsettled slots, one uint32 of
    slot bits per group.

    Phase 2, one loop: each lane takes its lowest pending (slot, group) item, the exponent
    before the fraction, runs the item's next Philox call per iteration, and settles it once
    no masked bit survives or its calls are done; an element is written out (flip, zero-out,
    keep) when its last item settles. The loop runs until every lane of the program is done:
    a lane waits only for the lanes of its own program, not for the slowest element of a
    block. A lane reads back only what it wrote itself, so no synchronisation is needed.
    """
    lanes = launch.lanes
    n_groups = len(groups)
    lane = lax.iota(jnp.int32, lanes)
    u32 = jnp.uint32

    def global_index(pos):
        return segments_global_index((first + pos).astype(u32), segments, base)

    def write(pos, x_bits, word, done, mask):
        """Where ``mask``: the flipped, zeroed-out element where ``done``, else the scratch word."""
        y, keep = finish(x_bits ^ word.astype(x_bits.dtype))
        _store(y_ref, pos, jnp.where(done, y, word.astype(x_bits.dtype)), mask)
        if keep_ref is not None:
            _store(keep_ref, pos, keep, mask & done)

    def first_calls(slot, pending):
        pos = slot * lanes + lane
        in_bounds = first + pos < n
        x_bits = _load(x_ref, pos, in_bounds)
        index = global_index(pos)
        word = jnp.zeros((lanes,), u32)
        unsettled = jnp.zeros((lanes,), jnp.bool_)
        pending = list(pending)
        for g, group in enumerate(groups):
            acc = _first_call_word(index, seeds[group.seed].astype(u32), group.halves, group.mask, mulhilo)
            word = word | acc
            alive = (acc != 0) & in_bounds & (group.halves > 4)  # more calls to come
            unsettled = unsettled | alive
            pending[g] = pending[g] | (alive.astype(u32) << slot.astype(u32))
        write(pos, x_bits, word, ~unsettled, in_bounds)
        return tuple(pending)

    slots = block // lanes
    zeros = jnp.zeros((lanes,), u32)
    per_step = min(2, slots)  # by hand: Pallas's Triton lowering has no scan unroll

    def first_calls_of_step(step, pending):
        for k in range(per_step):
            pending = first_calls(step * per_step + k, pending)
        return pending

    pending = lax.fori_loop(0, slots // per_step, first_calls_of_step, (zeros,) * n_groups)

    def per_group(values, g, dtype=jnp.int32):
        """``values[g]`` per lane, for the group ``g`` of each lane's item."""
        values = [jnp.asarray(v, dtype) for v in values]
        return values[0] if n_groups == 1 else jnp.where(g == 0, values[0], values[1])

    def lowest_bit(word):  # 32 for no bit
        lowest = 31 - lax.clz(lax.bitcast_convert_type(word & (~word + u32(1)), jnp.int32))
        return jnp.where(word == 0, 32, lowest)

    # the round count of the loop's calls: one for every lane when the groups that continue
    # (halves > 4) share it, else each lane's own, from one pass of 16 rounds
    codes = [rounds_index(group.halves) for group in groups]
    if n_groups == 1:
        rounds_branch = codes[0]
    else:
        exp_continues, frac_continues = (group.halves > 4 for group in groups)
        mixed = exp_continues & frac_continues & (codes[0] != codes[1])
        rounds_branch = jnp.where(mixed, len(ROUND_COUNTS), jnp.where(exp_continues, codes[0], codes[1]))

    def busy(state):
        pending, slot = state[0], state[1]
        idle = slot < 0
        for word in pending:
            idle = idle & (word == 0)
        return jnp.max((~idle).astype(jnp.int32)) > 0

    def next_call(state):
        pending, slot, g, call, acc, others, x_bits = state
        start = slot < 0
        lowest = [lowest_bit(word) for word in pending]
        new_g = jnp.zeros_like(slot) if n_groups == 1 else (lowest[1] < lowest[0]).astype(jnp.int32)
        new_slot = per_group(lowest, new_g)
        start = start & (new_slot < 32)
        slot = jnp.where(start, new_slot, slot)
        g = jnp.where(start, new_g, g)
        pending = tuple(jnp.where(start & (g == k), word & (word - u32(1)), word) for k, word in enumerate(pending))
        active = slot >= 0
        pos = jnp.maximum(slot, 0) * lanes + lane
        mask = per_group([group.mask for group in groups], g, u32)
        scratch = _load(y_ref, pos, start).astype(u32)
        acc = jnp.where(start, scratch & mask, acc)
        others = jnp.where(start, scratch ^ (scratch & mask), others)  # the other group's settled bits
        x_bits = jnp.where(start, _load(x_ref, pos, start), x_bits)  # loaded early: its latency hides behind Philox
        call = jnp.where(start, 1, call)

        seed = per_group([seeds[group.seed] for group in groups], g, u32)
        counter, key = global_index(pos), seed + call.astype(u32)

        def each_lane_rounds():
            states = philox4x32_after(counter, key, ROUND_COUNTS, mulhilo)
            code = per_group(codes, g)
            return tuple(jnp.where(code == 0, a, jnp.where(code == 1, b, c)) for a, b, c in zip(*states))

        words = lax.switch(rounds_branch, [
            *(lambda n_rounds=n_rounds: tuple(philox4x32(counter, key, n_rounds, mulhilo)) for n_rounds in ROUND_COUNTS),
            each_lane_rounds])
        full_calls = per_group([group.halves // 4 for group in groups], g)
        last_words = per_group([group.halves % 4 for group in groups], g)
        acc = and_call_words(acc, words, jnp.where(call < full_calls, 4, last_words))
        last_call = per_group([philox_calls(group.halves) - 1 for group in groups], g)
        settled = active & ((acc == 0) | (call == last_call))
        if n_groups == 2:  # the element's fraction item is still to come
            sibling = (g == 0) & (((pending[1] >> jnp.maximum(slot, 0).astype(u32)) & u32(1)) != 0)
        else:
            sibling = jnp.zeros_like(settled)
        write(pos, x_bits, others | acc, ~sibling, settled)
        return pending, jnp.where(settled, -1, slot), g, call + 1, acc, others, x_bits

    minus_one = jnp.full((lanes,), -1, jnp.int32)
    lax.while_loop(busy, next_call, (pending, minus_one, minus_one, minus_one, zeros, zeros,
                                     jnp.zeros((lanes,), x_ref.dtype)))


def bitflip_pallas(
    x_flat: jnp.ndarray,
    scalars: jnp.ndarray,
    *,
    segments: Segments,
    zero_out: bool,
    interpret: bool,
    launch: Launch | None = None,
    with_keep: bool = True,
):
    """Flip a flat array. ``scalars`` is uint32 ``[seed_exp, seed_frac, base, *setting]`` (the
    run-time setting of ``jaxflip.kernels_pallas.limits``: halves, zero-out flag, threshold bits).

    ``zero_out``: whether the setting may zero out (False: the kernel has no zero-out code and
    ignores the setting's flag). Returns ``y`` and, when ``zero_out`` and ``with_keep``, the
    int8 keep mask (``|y| < threshold`` before zero-out; all ones where the setting does not
    zero out), which is the backward pass's exact residual; a forward that no gradient needs
    passes ``with_keep=False`` and writes no mask. The kernel reads and writes bit patterns,
    never floats, so NaN payloads pass through untouched as in mase-triton (XLA on CPU would
    canonicalize them in a bfloat16 store). ``launch``: :func:`default_launch` when None.
    """
    return _bitflip_pallas(
        x_flat, scalars, segments=segments, zero_out=zero_out, interpret=interpret,
        launch=launch or default_launch(interpret), with_keep=with_keep and zero_out,
    )


@functools.partial(jax.jit, static_argnames=("segments", "zero_out", "interpret", "launch", "with_keep"))
def _bitflip_pallas(x_flat, scalars, *, segments, zero_out, interpret, launch: Launch, with_keep: bool):
    (n,) = x_flat.shape
    dtype_name = jnp.dtype(x_flat.dtype).name
    x_bits = lax.bitcast_convert_type(x_flat, BITS_DTYPE[dtype_name])
    # a small array gets one smaller block (a per-element program keeps its lanes: the rest is masked)
    block = min(launch.block, max(16, pl.next_power_of_2(n)))
    if launch.mode == "per_element":
        block = max(block, launch.lanes)
    out_shape = [jax.ShapeDtypeStruct((n,), x_bits.dtype)]
    if with_keep:
        out_shape.append(jax.ShapeDtypeStruct((n,), jnp.int8))
    kernel = functools.partial(
        _bitflip_kernel, n=n, block=block, segments=segments, dtype_name=dtype_name, zero_out=zero_out,
        interpret=interpret, launch=launch,
    )
    block_spec = pl.BlockSpec((block,), lambda i: (i,))
    compiler_params = None if interpret else plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=1)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((N_SCALARS,), lambda i: (0,)), block_spec],
        out_specs=[block_spec] * len(out_shape),
        interpret=interpret,
        compiler_params=compiler_params,
        name="jaxflip_random_bitflip",
    )(scalars, x_bits)
    y = lax.bitcast_convert_type(outs[0], x_flat.dtype)
    return y, (outs[1] if with_keep else None)
