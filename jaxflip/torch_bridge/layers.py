"""``RandomBitFlipLinear`` and ``RandomBitFlipDropout``: drop-ins for mase-triton's layers of
the same names, flipping with jaxflip through the DLPack bridge.

Same constructor arguments, attributes (``x_nearest_exp_halves``, ``x_seed_exp``, ...),
``from_linear`` and seed behaviour: each tensor whose three settings are not all None is
flipped at every call and its seeds advance; one whose settings are all None is passed on as it
is; the bias is not flipped. ``configure`` sets the flips from ``TensorFlip``s (halves), as
``jaxflip.bitflip.BitFlipLinear.configure`` does. A probability below the kernel's
``0.5 ** MAX_HALVES`` is refused when the layer is built (mase-triton: at its first call).
Beyond mase-triton: ``exact=False`` (keyword) flips with the sampled generator, the same
distribution drawn cheaper (``jaxflip.kernels_pallas.sampled``).
"""

from __future__ import annotations

import torch

from jaxflip.bitflip import TensorFlip, calculate_flip_probability
from jaxflip.bitflip.seeds import SEED_NAMES
from jaxflip.torch_bridge.functional import random_bitflip_fn


class RandomBitFlipLinear(torch.nn.Linear):
    """``y = flip(x) @ flip(W)^T + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype,
                 x_p_exp: float | None, x_p_frac: float | None, x_zero_out_t: float | None,
                 w_p_exp: float | None, w_p_frac: float | None, w_zero_out_t: float | None,
                 x_seed_exp: int = 0, x_seed_frac: int = 0, w_seed_exp: int = 0, w_seed_frac: int = 0, *,
                 exact: bool = True) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.exact = exact
        self.configure(TensorFlip.from_probabilities(x_p_exp, x_p_frac, x_zero_out_t, name="x_"),
                       TensorFlip.from_probabilities(w_p_exp, w_p_frac, w_zero_out_t, name="w_"),
                       (x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac))
        # mase-triton keeps the probabilities as given (configure sets the snapped 0.5 ** halves)
        self.x_p_exp, self.x_p_frac, self.w_p_exp, self.w_p_frac = x_p_exp, x_p_frac, w_p_exp, w_p_frac

    def configure(self, x_flip: TensorFlip, w_flip: TensorFlip, seeds: tuple[int, int, int, int] = (0, 0, 0, 0)):
        """Flip the input and the weight as ``x_flip`` and ``w_flip`` say (their halves kept as
        they are), from starting seeds ``(x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac)``."""
        for prefix, flip in (("x", x_flip), ("w", w_flip)):
            setattr(self, f"{prefix}_nearest_exp_halves", flip.exp_halves)
            setattr(self, f"{prefix}_nearest_frac_halves", flip.frac_halves)
            setattr(self, f"{prefix}_zero_out_t", flip.zero_out_t)
            setattr(self, f"{prefix}_p_exp", calculate_flip_probability(flip.exp_halves))
            setattr(self, f"{prefix}_p_frac", calculate_flip_probability(flip.frac_halves))
        for name, seed in zip(SEED_NAMES, seeds):
            setattr(self, name, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _flips(self.x_nearest_exp_halves, self.x_nearest_frac_halves, self.x_zero_out_t):
            x, self.x_seed_exp, self.x_seed_frac = random_bitflip_fn(
                x, self.x_nearest_exp_halves, self.x_nearest_frac_halves, self.x_seed_exp, self.x_seed_frac,
                self.x_zero_out_t, exact=self.exact)
        if _flips(self.w_nearest_exp_halves, self.w_nearest_frac_halves, self.w_zero_out_t):
            w, self.w_seed_exp, self.w_seed_frac = random_bitflip_fn(
                w, self.w_nearest_exp_halves, self.w_nearest_frac_halves, self.w_seed_exp, self.w_seed_frac,
                self.w_zero_out_t, exact=self.exact)
        return torch.nn.functional.linear(x, w, self.bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, x_p_exp: float | None = None, x_p_frac: float | None = None,
                    x_zero_out_t: float | None = None, w_p_exp: float | None = None, w_p_frac: float | None = None,
                    w_zero_out_t: float | None = None, x_seed_exp: int = 0, x_seed_frac: int = 0, w_seed_exp: int = 0,
                    w_seed_frac: int = 0, *, exact: bool = True) -> RandomBitFlipLinear:
        """A bitflip layer holding a copy of ``linear``'s weight and bias (settings left out: no
        flips, until ``configure``)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                    linear.weight.dtype, x_p_exp=x_p_exp, x_p_frac=x_p_frac, x_zero_out_t=x_zero_out_t,
                    w_p_exp=w_p_exp, w_p_frac=w_p_frac, w_zero_out_t=w_zero_out_t, x_seed_exp=x_seed_exp,
                    x_seed_frac=x_seed_frac, w_seed_exp=w_seed_exp, w_seed_frac=w_seed_frac, exact=exact)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, x_nearest_p_exp={format_probability(self.x_nearest_exp_halves)}, "
                f"x_nearest_p_frac={format_probability(self.x_nearest_frac_halves)}, "
                f"x_zero_out_threshold={self.x_zero_out_t}, "
                f"x_seed_exp={self.x_seed_exp}, x_seed_frac={self.x_seed_frac}, "
                f"w_nearest_p_exp={format_probability(self.w_nearest_exp_halves)}, "
                f"w_nearest_p_frac={format_probability(self.w_nearest_frac_halves)}, "
                f"w_zero_out_threshold={self.w_zero_out_t}, "
                f"w_seed_exp={self.w_seed_exp}, w_seed_frac={self.w_seed_frac}")


class RandomBitFlipDropout(torch.nn.Module):
    """``y = flip(x)``: mase-triton's ``RandomBitFlipDropout`` (same arguments and attributes;
    ``device`` is accepted and unused, as there). With all three settings None, ``x`` is
    returned as it is."""

    def __init__(self, p_exp: float | None, p_frac: float | None, zero_out_t: float | None, seed_exp: int = 0,
                 seed_frac: int = 0, device: str | torch.device | None = None, *, exact: bool = True) -> None:
        super().__init__()
        self.exact = exact
        flip = TensorFlip.from_probabilities(p_exp, p_frac, zero_out_t)
        self.p_exp, self.p_frac, self.zero_out_t = p_exp, p_frac, flip.zero_out_t
        self.nearest_exp_halves, self.nearest_frac_halves = flip.exp_halves, flip.frac_halves
        self.seed_exp, self.seed_frac = seed_exp, seed_frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _flips(self.nearest_exp_halves, self.nearest_frac_halves, self.zero_out_t):
            return x
        y, self.seed_exp, self.seed_frac = random_bitflip_fn(x, self.nearest_exp_halves, self.nearest_frac_halves,
                                                             self.seed_exp, self.seed_frac, self.zero_out_t,
                                                             exact=self.exact)
        return y

    def extra_repr(self) -> str:
        return (f"nearest_p_exp={format_probability(self.nearest_exp_halves)}, "
                f"nearest_p_frac={format_probability(self.nearest_frac_halves)}, "
                f"zero_out_threshold={self.zero_out_t}, seed_exp={self.seed_exp}, seed_frac={self.seed_frac}")


def _flips(exp_halves: int | None, frac_halves: int | None, zero_out_t: float | None) -> bool:
    return not (exp_halves is None and frac_halves is None and zero_out_t is None)


def format_probability(halves: int | None) -> str:
    """A flip probability as mase-triton's ``extra_repr`` writes it."""
    return "None" if halves is None else f"{calculate_flip_probability(halves):.2e}"
