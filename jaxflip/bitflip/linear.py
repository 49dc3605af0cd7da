"""``BitFlipLinear``: a Linear layer whose input and weight pass through random bit flips.

Same computation as mase-triton's ``RandomBitFlipLinear``::

    y = flip(x) @ flip(W)^T + b        (the bias is not flipped)

The weight is stored in torch layout ``(out_features, in_features)``: ``random_bitflip`` keys
each flip on the element's row-major index, so this layout flips exactly the elements that
mase-triton flips in ``nn.Linear.weight``, and HF weights copy in unchanged.

Flip settings are static Python attributes (they select the compiled code); the seeds are
``BitflipSeed`` state that every call advances.

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
from flax import nnx
from jax.sharding import NamedSharding

from jaxflip.bitflip.seeds import SEED_NAMES, BitflipSeed
from jaxflip.kernels_pallas import random_bitflip
from jaxflip.kernels_pallas.limits import flip_halves

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


def _threshold(name: str, t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or t < 0:
        raise ValueError(f"{name} must be a number >= 0 or None, got {t!r}")
    return float(t)


def flip_tensor(value: jax.Array, flip: TensorFlip, seed_exp: BitflipSeed, seed_frac: BitflipSeed,
                sharding: NamedSharding | None = None) -> jax.Array:
    """Flip ``value`` with the current seeds and store the advanced seeds back. With a
    ``sharding`` (over several devices), ``value`` is constrained to it and each device flips
    its own shard."""
    if not flip.enabled:
        return value
    if sharding is not None:
        value = jax.lax.with_sharding_constraint(value, sharding)
    flipped, next_exp, next_frac = random_bitflip(
        value, flip.exp_halves, flip.frac_halves, seed_exp[...], seed_frac[...], flip.zero_out_t, sharding=sharding
    )
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
        self.x_flip = TensorFlip()
        self.w_flip = TensorFlip()
        # True: the input seeds start equal to those of each sibling Linear of the same parent
        # module with the same x_flip (rules.apply_rule_table), see flip_shared_input
        self.x_seeds_shared = False
        self.x_seed_exp = BitflipSeed(jnp.int32(0))
        self.x_seed_frac = BitflipSeed(jnp.int32(0))
        self.w_seed_exp = BitflipSeed(jnp.int32(0))
        self.w_seed_frac = BitflipSeed(jnp.int32(0))  # SEED_NAMES, in this order

    def configure(self, x_flip: TensorFlip, w_flip: TensorFlip, seeds: tuple[int, int, int, int] = (0, 0, 0, 0),
                  *, x_seeds_shared: bool = False):
        """Set the flips of the input and the weight and their starting seeds
        ``(x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac)``; ``x_seeds_shared``: see the
        module's doc."""
        self.x_flip, self.w_flip = x_flip, w_flip
        self.x_seeds_shared = x_seeds_shared
        for name, seed in zip(SEED_NAMES, seeds):
            getattr(self, name)[...] = jnp.int32(seed)

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
        return flip_tensor(x, self.x_flip, self.x_seed_exp, self.x_seed_frac,
                           self.sharding(activation_axes(x.ndim), x.shape))

    def project(self, x: jax.Array) -> jax.Array:
        """``x @ flip(W)^T + b`` of an input already flipped (``flip_input``)."""
        w = self.effective_weight()
        w = flip_tensor(w, self.w_flip, self.w_seed_exp, self.w_seed_frac, self.sharding(self.axes, w.shape))
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), w.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def flip_shared_input(x: jax.Array, linears: Sequence[BitFlipLinear]) -> list[jax.Array]:
    """Each of ``linears``' flipped copy of their common input ``x``. Those marked
    ``x_seeds_shared`` with the same ``x_flip`` flip it once, with the first one's seeds (the
    same as theirs), and each takes the advanced seeds; the others flip it themselves."""
    flipped = [None] * len(linears)
    for i, linear in enumerate(linears):
        if flipped[i] is not None:
            continue
        flipped[i] = linear.flip_input(x)
        if not (linear.x_seeds_shared and linear.x_flip.enabled):
            continue
        for j in range(i + 1, len(linears)):
            sibling = linears[j]
            if flipped[j] is None and sibling.x_seeds_shared and sibling.x_flip == linear.x_flip:
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
