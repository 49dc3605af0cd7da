"""The bitflip op's limits and the flip probability <-> halves mapping, checked in one place.

The kernel's contract (``SPEC.md``): a flip probability is ``0.5 ** halves`` with ``halves`` in
``1..MAX_HALVES``, and a Philox seed lies in ``[0, SEED_LIMIT)``. Every layer checks its inputs
with these functions: the op itself, the rules (``jaxflip.bitflip``), the train config and the
torch bridge. This module sits at the bottom, beside the op and importing nothing of jaxflip,
because the op cannot import ``jaxflip.bitflip`` (which imports the op).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

MAX_HALVES = 24  # the smallest flip probability the kernel supports is 0.5**24
SEED_LIMIT = 2**31 - 8  # 0 <= seed < 2**31 - 8: mase-triton's exact range; advanced seeds wrap modulo it

# The run-time form of one tensor's flip settings, an int32 vector of SETTING_SIZE: the halves
# of each group (0: that group off), whether to zero out, and the zero-out threshold's float32
# bits. All zeros is "off": a model's settings start so. The compiled op reads it as data, so
# one program serves every halves and threshold (issue 25).
EXP_HALVES, FRAC_HALVES, ZERO_OUT, THRESHOLD_BITS = range(4)
SETTING_SIZE = 4


def find_nearest_prob_n_halves(p: float | None) -> int | None:
    """``ceil(log2(1 / p))``: the halves whose ``0.5 ** halves`` is the largest <= ``p``
    (mase-triton's function: any p in (0, 1), also below the kernel's ``0.5 ** MAX_HALVES``)."""
    return _nearest_halves("p", p)


def calculate_flip_probability(halves: int | None) -> float | None:
    """``0.5 ** halves`` for an int ``halves >= 1`` (mase-triton's function: also above the
    kernel's ``MAX_HALVES``, which the op refuses)."""
    if halves is None:
        return None
    if isinstance(halves, bool) or not isinstance(halves, numbers.Integral) or halves < 1:
        raise ValueError(f"halves must be an int >= 1 or None, got {halves!r}")
    return 0.5**halves


def flip_halves(name: str, p: float | None) -> int | None:
    """The halves of flip probability ``p`` (None: no flips), which must be one the kernel
    supports: a number in (0, 1), at least ``0.5 ** MAX_HALVES``. Raises ``ValueError`` naming
    ``name`` otherwise."""
    halves = _nearest_halves(name, p)
    if halves is not None and halves > MAX_HALVES:
        raise ValueError(f"{name}={p!r} is below the smallest supported flip probability "
                         f"0.5**{MAX_HALVES} = {0.5**MAX_HALVES:.3g}")
    return halves


def _nearest_halves(name: str, p) -> int | None:
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
        raise ValueError(f"{name} must be a probability in (0, 1) or None, got {p!r}")
    inverse = 1 / float(p)
    # below 2**-1024 (subnormal) 1 / p overflows to inf; -log2(p) is the same number there
    return math.ceil(math.log2(inverse)) if math.isfinite(inverse) else math.ceil(-math.log2(p))


def check_halves(name: str, halves) -> None:
    """None, or an int in ``1..MAX_HALVES``; else ``TypeError`` / ``ValueError`` naming ``name``."""
    if halves is None:
        return
    if isinstance(halves, bool) or not isinstance(halves, numbers.Integral):
        raise TypeError(f"{name} must be an int in 1..{MAX_HALVES} or None, got {halves!r}")
    if not 1 <= halves <= MAX_HALVES:
        raise ValueError(f"{name} must be in 1..{MAX_HALVES} (flip probability 0.5**{name}), got {halves}")


def check_threshold(threshold) -> float | None:
    """The zero-out threshold as a float (None: no zero-out); ``TypeError`` unless a real
    number, ``ValueError`` unless ``>= 0``."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"zero_out_threshold must be a float or None, got {threshold!r}")
    if not threshold >= 0:
        raise ValueError(f"zero_out_threshold must be >= 0, got {threshold}")
    return float(threshold)


def check_seed(name: str, seed) -> int:
    """``seed`` as an int when it is an integer in ``[0, SEED_LIMIT)``; else ``ValueError``
    naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**31 - 8), got {seed!r}")
    return int(seed)


def flip_setting(exp_halves: int | None, frac_halves: int | None, threshold: float | None) -> np.ndarray:
    """The run-time setting vector of these (checked) halves and threshold, a host int32 array."""
    check_halves("exp_halves", exp_halves)
    check_halves("frac_halves", frac_halves)
    threshold = check_threshold(threshold)
    setting = np.zeros(SETTING_SIZE, np.int32)
    setting[EXP_HALVES] = exp_halves or 0
    setting[FRAC_HALVES] = frac_halves or 0
    if threshold is not None:
        setting[ZERO_OUT] = 1
        # float32 as the reference's kernel argument is; a threshold past float32's range is inf
        with np.errstate(over="ignore"):
            setting[THRESHOLD_BITS] = np.float32(threshold).view(np.int32)
    return setting


def setting_values(setting) -> tuple[int | None, int | None, float | None]:
    """``(exp_halves, frac_halves, threshold)`` of a concrete setting vector (None: off)."""
    values = np.asarray(setting, np.int32)
    threshold = float(values[THRESHOLD_BITS:THRESHOLD_BITS + 1].view(np.float32)[0]) if values[ZERO_OUT] else None
    return int(values[EXP_HALVES]) or None, int(values[FRAC_HALVES]) or None, threshold
