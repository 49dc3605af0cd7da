"""``BitFlipLinear``: a Linear layer whose input and weight pass through random bit flips.

Same computation as mase-triton's ``RandomBitFlipLinear``::

    y = flip(x) @ flip(W)^T + b        (the bias is not flipped)

The weight is stored in torch layout ``(out_features, in_features)``: ``random_bitflip`` keys
each flip on the element's row-major index, so this layout flips exactly the elements that
mase-triton flips in ``nn.Linear.weight``, and HF weights copy in unchanged.

Flip settings are run-time state, as the seeds are: each flipped tensor's halves and
zero-out threshold are a ``FlipSetting`` (``configure`` writes them; ``x_flip``/``w_flip`` read
them back), its seeds ``BitflipSeed`` state that every call advances. Changing either compiles
nothing. What is static is what the compiled code can do, ``Armed`` per tensor: whether it
flips at all and whether it may zero out. ``configure`` keeps the arming when it covers the
new settings, so a campaign that arms once for all its points (``jaxflip.bitflip.arm_for_tables``)
runs every point, every per-layer cell and every seed with one compiled forward; a tensor
armed but set off runs no Philox.

Linears that read the same tensor (q/k/v, gate/up) and flip it alike, with input seeds that
start equal (mase-triton's recipe gives every Linear the same seeds), flip it identically, so
``flip_shared_input`` flips it once for all of them and gives each the advanced seeds: one
Philox pass instead of three (two), the same bits and values; the input's gradient sums the
readers' gradients before the keep mask instead of after, equal up to float rounding.
``apply_rule_table`` marks such Linears (``x_seeds_shared``, a static attribute: the sharing is
decided when tracing); seeds written by hand afterwards must keep siblings equal, or
``configure`` them again.

On a multi-device mesh each device flips only its own shard, by global element index, so N
devices flip exactly the bits one device would at 1/N of the work: the input on its batch
shard, the weight on its FSDP shard before XLA gathers it for the matmul (flipping then
gathering equals gathering then flipping, the flips being keyed on global indices). The
tensor is first constrained to that layout, then ``random_bitflip`` runs the kernel under
``shard_map`` with that sharding. A Pallas kernel is opaque to XLA's partitioner; left to it,
every device would gather the whole tensor and flip all of it. The layout is the model's
(MaxText passes its sharding rules down the same way): the model hands each layer a
``layout`` function, ``jaxflip.models.sharding.context_sharding`` for jaxflip's Llama, which
maps logical axis names to a sharding on the enclosing ``jax.set_mesh``; this package knows
no mesh axes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxflip.bitflip.seeds import SEED_NAMES, BitflipSeed, FlipSetting
from jaxflip.kernels_pallas.limits import SETTING_SIZE, flip_halves, flip_setting, setting_values
from jaxflip.kernels_pallas.random_bitflip import flip_with_setting

# ``(logical_axes, shape) -> sharding``: where a tensor with these logical axis names lies on
# the current mesh (None: no mesh, or one device)
Layout = Callable[[Sequence[str | None], Sequence[int]], NamedSharding | None]

# the LM head's module name (HF's, and jaxflip.models.llama's attribute): NewComputeBench's
# recipe never flips it and gives it no LoRA adapter
LM_HEAD = "lm_head"

default_weight_init = nnx.initializers.normal(stddev=0.02)  # what HF Llama uses for Linear layers


@dataclass(frozen=True)
class TensorFlip:
    """How one tensor is flipped: ``0.5 ** halves`` per bit of each group, then zero-out of
    ``|y| >= zero_out_t`` (NaN and inf included). All three None: the tensor is untouched."""

    exp_halves: int | None = None
    frac_halves: int | None = None
    zero_out_t: float | None = None

    @classmethod
    def from_probabilities(cls, p_exp: float | None, p_frac: float | None, zero_out_t: float | None, *,
                           name: str = "") -> TensorFlip:
        """The flip of settings ``{name}p_exp``, ``{name}p_frac`` and ``{name}zero_out_t``, checked:
        each probability None or in (0, 1), snapped to ``0.5 ** ceil(log2(1 / p))`` as mase-triton
        does and no smaller than the kernel's ``0.5 ** MAX_HALVES``; the threshold None or >= 0.
        Raises ``ValueError`` naming the setting (``name`` is its prefix, e.g. ``"bitflip.x_"``)."""
        return cls(flip_halves(f"{name}p_exp", p_exp), flip_halves(f"{name}p_frac", p_frac),
                   _threshold(f"{name}zero_out_t", zero_out_t))

    @property
    def enabled(self) -> bool:
        return not (self.exp_halves is None and self.frac_halves is None and self.zero_out_t is None)

    def __str__(self) -> str:
        if not self.enabled:
            return "off"

        def prob(halves):
            return "-" if halves is None else f"0.5^{halves}"

        zero_out = "-" if self.zero_out_t is None else f"{self.zero_out_t:g}"
        return f"p_exp={prob(self.exp_halves)} p_frac={prob(self.frac_halves)} zero_out_t={zero_out}"

    @property
    def setting(self) -> np.ndarray:
        """The run-time form (``FlipSetting``'s value), a host int32 vector."""
        return flip_setting(self.exp_halves, self.frac_halves, self.zero_out_t)

    @classmethod
    def from_setting(cls, setting) -> TensorFlip:
        """The flip a concrete run-time setting holds (its threshold as the float32 the op uses)."""
        return cls(*setting_values(setting))


@dataclass(frozen=True)
class Armed:
    """What one tensor's compiled flip can do: flip bits (at any halves) and zero out (at any
    threshold), with mase-triton's stream (``exact``) or the sampled generator of the same
    distribution. Static: arming differently compiles another program; the settings within it
    are run-time data."""

    flips: bool = False
    zero_out: bool = False
    exact: bool = True

    @classmethod
    def needed_by(cls, flip: TensorFlip, exact: bool = True) -> Armed:
        return cls(flip.exp_halves is not None or flip.frac_halves is not None, flip.zero_out_t is not None, exact)

    def covers(self, flip: TensorFlip, exact: bool = True) -> bool:
        return self.exact == exact and self | Armed.needed_by(flip, exact) == self

    def __or__(self, other: Armed) -> Armed:
        if self.exact != other.exact and self.flips and other.flips:
            raise ValueError("one tensor cannot be armed for both exact and sampled flips")
        return Armed(self.flips or other.flips, self.zero_out or other.zero_out,
                     self.exact if self.flips else other.exact)

    @property
    def any(self) -> bool:
        return self.flips or self.zero_out


def _threshold(name: str, t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or t < 0:
        raise ValueError(f"{name} must be a number >= 0 or None, got {t!r}")
    return float(t)


def flip_tensor(value: jax.Array, armed: Armed, setting: FlipSetting, seed_exp: BitflipSeed,
                seed_frac: BitflipSeed, sharding: NamedSharding | None = None) -> jax.Array:
    """Flip ``value`` as its run-time ``setting`` says, with the current seeds, and store the
    advanced seeds back; ``armed``: what the compiled code can do (nothing: ``value`` as is).
    With a ``sharding`` (over several devices), ``value`` is constrained to it and each
    device flips its own shard."""
    if not armed.any:
        return value
    if sharding is not None:
        value = jax.lax.with_sharding_constraint(value, sharding)
    flipped, next_exp, next_frac = flip_with_setting(
        value, setting.get_value(), seed_exp[...], seed_frac[...], flips=armed.flips, zero_out=armed.zero_out,
        sharding=sharding, exact=armed.exact)
    # set_value, not ``seed[...] =``: flax compares the shardings of an indexed write, and a
    # tracer's missing sharding costs jax 0.10 a print of the trace so far (quadratic tracing)
    seed_exp.set_value(next_exp)
    seed_frac.set_value(next_frac)
    return flipped


def activation_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a Linear's input ``(batch, ..., features)``: split by batch rows only."""
    return ("batch",) + (None,) * (ndim - 1) if ndim >= 2 else (None,)


class BitFlipLinear(nnx.Module):
    """``y = flip(x) @ flip(W)^T + b``, W of shape ``(out_features, in_features)``.

    ``axes``: logical axis names of the weight, ``(out_axis, in_axis)``; ``layout``: the model's
    map from logical axes to a sharding on the current mesh (see the module's doc; None: no
    sharding, each flip sees the whole tensor). ``dtype``: the matmul's dtype (default:
    ``param_dtype``).
    The weight is flipped in its stored dtype and the input in the dtype it arrives in (as
    mase-triton does under torch autocast), then both are cast to ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        axes: tuple[str | None, str | None] = (None, None),
        layout: Layout | None = None,
        param_dtype=jnp.float32,
        dtype=None,
        weight_init=default_weight_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.axes = axes
        self.layout = layout
        self.dtype = dtype if dtype is not None else param_dtype
        self.weight = nnx.Param(
            weight_init(rngs.params(), (out_features, in_features), param_dtype),
            out_sharding=axes, eager_sharding=False,
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[0],), eager_sharding=False)
            if use_bias else None
        )
        self.x_armed = Armed()
        self.w_armed = Armed()
        self.x_setting = FlipSetting(jnp.zeros(SETTING_SIZE, jnp.int32))
        self.w_setting = FlipSetting(jnp.zeros(SETTING_SIZE, jnp.int32))
        # True: the input seeds start equal to those of each sibling Linear of the same parent
        # module with the same x_flip (rules.apply_rule_table), see flip_shared_input
        self.x_seeds_shared = False
        self.x_seed_exp = BitflipSeed(jnp.int32(0))
        self.x_seed_frac = BitflipSeed(jnp.int32(0))
        self.w_seed_exp = BitflipSeed(jnp.int32(0))
        self.w_seed_frac = BitflipSeed(jnp.int32(0))  # SEED_NAMES, in this order

    def configure(self, x_flip: TensorFlip, w_flip: TensorFlip, seeds: tuple[int, int, int, int] = (0, 0, 0, 0),
                  *, x_seeds_shared: bool = False, exact: bool = True):
        """Set the flips of the input and the weight and their starting seeds
        ``(x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac)``, as device arrays (the compiled
        call takes them as arguments); ``x_seeds_shared``: see the module's doc; ``exact``:
        mase-triton's stream, or (False) the sampled generator. A tensor's arming is kept when
        it covers the new flip (no new program), else set to what the flip needs."""
        for tensor, flip in (("x", x_flip), ("w", w_flip)):
            armed = getattr(self, f"{tensor}_armed")
            if not armed.covers(flip, exact):
                setattr(self, f"{tensor}_armed", Armed.needed_by(flip, exact))
            getattr(self, f"{tensor}_setting").set_value(jnp.asarray(flip.setting))
        self.x_seeds_shared = x_seeds_shared
        for name, seed in zip(SEED_NAMES, seeds):
            getattr(self, name).set_value(jnp.int32(seed))

    def arm(self, x_armed: Armed, w_armed: Armed) -> None:
        """Set what the compiled flips of the input and the weight can do (``Armed``), e.g. the
        union over a campaign's settings, so that ``configure`` with any of them compiles nothing."""
        self.x_armed, self.w_armed = x_armed, w_armed

    @property
    def x_flip(self) -> TensorFlip:
        """The input's flip setting, read back from the run-time state (eagerly)."""
        return TensorFlip.from_setting(self.x_setting.get_value())

    @property
    def w_flip(self) -> TensorFlip:
        """The weight's flip setting, read back from the run-time state (eagerly)."""
        return TensorFlip.from_setting(self.w_setting.get_value())

    def seeds(self) -> tuple[int, int, int, int]:
        """The current seeds ``(x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac)``."""
        return tuple(int(getattr(self, name)[...]) for name in SEED_NAMES)

    def effective_weight(self) -> jax.Array:
        """The weight the matmul sees before flipping (LoRA adds its update here)."""
        return self.weight[...]

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding | None:
        """Where a tensor with these logical axes lies on the current mesh (``layout``)."""
        return None if self.layout is None else self.layout(logical_axes, shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(self.flip_input(x))

    def flip_input(self, x: jax.Array) -> jax.Array:
        """``x`` through this layer's input flip (advancing its input seeds)."""
        return flip_tensor(x, self.x_armed, self.x_setting, self.x_seed_exp, self.x_seed_frac,
                           self.sharding(activation_axes(x.ndim), x.shape))

    def project(self, x: jax.Array) -> jax.Array:
        """``x @ flip(W)^T + b`` of an input already flipped (``flip_input``)."""
        w = self.effective_weight()
        w = flip_tensor(w, self.w_armed, self.w_setting, self.w_seed_exp, self.w_seed_frac,
                        self.sharding(self.axes, w.shape))
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), w.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def flip_shared_input(x: jax.Array, linears: Sequence[BitFlipLinear]) -> list[jax.Array]:
    """Each of ``linears``' flipped copy of their common input ``x``. Those marked
    ``x_seeds_shared`` (which ``apply_rule_table`` gives only to siblings with the same input
    flip and seeds) and armed alike flip it once, with the first one's seeds (the same as
    theirs), and each takes the advanced seeds; the others flip it themselves."""
    flipped = [None] * len(linears)
    for i, linear in enumerate(linears):
        if flipped[i] is not None:
            continue
        flipped[i] = linear.flip_input(x)
        if not (linear.x_seeds_shared and linear.x_armed.any):
            continue
        for j in range(i + 1, len(linears)):
            sibling = linears[j]
            if flipped[j] is None and sibling.x_seeds_shared and sibling.x_armed == linear.x_armed:
                flipped[j] = flipped[i]
                sibling.x_seed_exp.set_value(linear.x_seed_exp.get_value())
                sibling.x_seed_frac.set_value(linear.x_seed_frac.get_value())
    return flipped


def named_linears(model: nnx.Module) -> dict[str, BitFlipLinear]:
    """Every ``BitFlipLinear`` of ``model`` by its dotted path (in NNX's traversal order:
    attribute names sorted, list items by index).

    For the Llama models these are HF's module names (``model.layers.0.self_attn.q_proj``,
    ``lm_head``), the names NewComputeBench's layer-name regexes are written against.
    """
    return {
        ".".join(str(part) for part in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, BitFlipLinear)
    }


def replace_module(root: nnx.Module, dotted_name: str, new: nnx.Module) -> None:
    """Put ``new`` where ``named_linears`` (or any dotted module path) names a submodule."""
    *parents, last = dotted_name.split(".")
    parent = root
    for part in parents:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)
