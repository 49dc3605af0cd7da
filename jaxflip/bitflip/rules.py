"""Bitflip rules in NewComputeBench's form, applied to a model in one call.

A rule set maps layer-name regexes to settings, as NewComputeBench's YAML configs do::

    {
        "default": {"x_p_exp": 0.5**16, "x_p_frac": 0.5**16, "x_zero_out_t": 30.0,
                    "w_p_exp": 0.5**16, "w_p_frac": 0.5**16, "w_zero_out_t": 1.25},
        r"model\\.layers\\.0\\..*": None,          # skip the first block
    }

Matching follows NewComputeBench (``re.fullmatch``, the first pattern in order wins, then
``default``, then no flips), with one difference: the LM head (``lm_head``) only flips when a
pattern other than ``default`` names it, because NewComputeBench's recipe never flips it.

Settings: ``{x,w}_p_{exp,frac}`` (a probability in (0, 1), snapped to ``0.5 ** halves`` with
``halves = ceil(log2(1 / p))``, or None), ``{x,w}_zero_out_t`` (>= 0 or None) and
``{x,w}_seed_{exp,frac}`` (starting seeds, default 0; used in ``seed_mode="reference"``). A
missing setting means None (seeds: 0).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flax import nnx

from jaxflip import find_nearest_prob_n_halves
from jaxflip.bitflip.linear import TensorFlip, named_linears
from jaxflip.bitflip.seeds import SEED_LIMIT, SEED_NAMES, independent_seed

PROBABILITY_KEYS = ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")
THRESHOLD_KEYS = ("x_zero_out_t", "w_zero_out_t")
RULE_KEYS = PROBABILITY_KEYS + THRESHOLD_KEYS + SEED_NAMES
DEFAULT = "default"
LM_HEAD = "lm_head"
MAX_HALVES = 24  # the smallest flip probability the kernel supports is 0.5**24
SEED_MODES = ("reference", "independent")


@dataclass(frozen=True)
class RuleRow:
    """What one Linear got: the pattern that chose its settings (None: no rule applied) and
    its flips and starting seeds ``(x_seed_exp, x_seed_frac, w_seed_exp, w_seed_frac)``."""

    layer: str
    pattern: str | None
    x_flip: TensorFlip
    w_flip: TensorFlip
    seeds: tuple[int, int, int, int]

    @property
    def flipped(self) -> bool:
        return self.x_flip.enabled or self.w_flip.enabled


class RuleTable(list):
    """The rows of ``apply_bitflip_rules``, one per Linear; ``str()`` gives a printable table."""

    def __str__(self) -> str:
        header = ("layer", "rule", "x", "w", "seeds x_exp x_frac w_exp w_frac")
        lines = [header] + [
            (row.layer, "-" if row.pattern is None else row.pattern, str(row.x_flip), str(row.w_flip),
             " ".join(str(s) for s in row.seeds))
            for row in self
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def apply_bitflip_rules(model: nnx.Module, rules: Mapping, seed_mode: str = "reference", base_seed: int = 0) -> RuleTable:
    """Configure every ``BitFlipLinear`` of ``model`` from ``rules`` (in place) and return
    which layer got which rule (see ``match_rules``)."""
    linears = named_linears(model)
    table = match_rules(list(linears), rules, seed_mode, base_seed)
    for row in table:
        linears[row.layer].configure(row.x_flip, row.w_flip, row.seeds)
    return table


def match_rules(layer_names: list[str], rules: Mapping, seed_mode: str = "reference", base_seed: int = 0) -> RuleTable:
    """The flips and starting seeds that ``rules`` give each of ``layer_names`` (the Linears
    of a model, by HF module name); any framework's model can be configured from the table.

    Layers no rule applies to get no flips. Starting seeds: the rule's seeds
    (``seed_mode="reference"``, mase-triton's behaviour) or, ignoring the rule's seeds,
    per-layer seeds hashed from ``base_seed`` and the layer name (``"independent"``, see
    ``jaxflip.bitflip.seeds``). Raises ``ValueError`` on an unknown key, a probability
    outside (0, 1) or below 0.5**24, a negative threshold, a bad seed, a pattern that is not a
    valid regex or that matches no layer.
    """
    if seed_mode not in SEED_MODES:
        raise ValueError(f"seed_mode must be one of {SEED_MODES}, got {seed_mode!r}")
    settings, patterns = parse_rules(rules)
    for pattern, regex in patterns.items():
        if not any(regex.fullmatch(name) for name in layer_names):
            raise ValueError(
                f"bitflip rule {pattern!r} matches no layer (patterns must match a whole layer name); "
                f"layers are: {', '.join(layer_names)}"
            )

    table = RuleTable()
    for name in layer_names:
        pattern = next((p for p, regex in patterns.items() if regex.fullmatch(name)), None)
        if pattern is None and name != LM_HEAD and DEFAULT in rules:
            pattern = DEFAULT
        rule = settings.get(pattern)
        if rule is None:
            x_flip, w_flip, seeds = TensorFlip(), TensorFlip(), (0, 0, 0, 0)
        else:
            x_flip, w_flip, seeds = rule
            if seed_mode == "independent":
                seeds = tuple(independent_seed(base_seed, name, seed_name) for seed_name in SEED_NAMES)
        table.append(RuleRow(name, pattern, x_flip, w_flip, seeds))
    return table


def parse_rules(rules: Mapping) -> tuple[dict, dict[str, re.Pattern]]:
    """``(settings, patterns)``: each rule's ``(x_flip, w_flip, seeds)`` (None: skip) and each
    pattern but ``default`` compiled. Raises ``ValueError`` as ``match_rules`` does, less the
    check that needs the layer names."""
    if not isinstance(rules, Mapping):
        raise ValueError(f"bitflip rules must be a mapping from layer-name regex to settings, got {type(rules).__name__}")
    settings = {pattern: _parse_rule(pattern, rule) for pattern, rule in rules.items()}
    patterns = {pattern: _compile(pattern) for pattern in rules if pattern != DEFAULT}
    return settings, patterns


def _compile(pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"bitflip rule keys must be layer-name regexes (str), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"bitflip rule {pattern!r} is not a valid regex: {error}") from None


def _parse_rule(pattern: str, rule) -> tuple[TensorFlip, TensorFlip, tuple[int, int, int, int]] | None:
    """``(x_flip, w_flip, seeds)`` of one rule, or None for a rule that skips its layers."""
    if rule is None:
        return None
    if not isinstance(rule, Mapping):
        raise ValueError(f"bitflip rule {pattern!r} must map to a dict of settings or None, got {rule!r}")
    unknown = sorted(set(rule) - set(RULE_KEYS), key=str)
    if unknown:
        raise ValueError(f"bitflip rule {pattern!r} has unknown key(s) {unknown}; allowed keys: {', '.join(RULE_KEYS)}")
    halves = {key: _halves(pattern, key, rule.get(key)) for key in PROBABILITY_KEYS}
    thresholds = {key: _threshold(pattern, key, rule.get(key)) for key in THRESHOLD_KEYS}
    seeds = tuple(_seed(pattern, key, rule.get(key, 0)) for key in SEED_NAMES)
    x_flip = TensorFlip(halves["x_p_exp"], halves["x_p_frac"], thresholds["x_zero_out_t"])
    w_flip = TensorFlip(halves["w_p_exp"], halves["w_p_frac"], thresholds["w_zero_out_t"])
    return x_flip, w_flip, seeds


def _halves(pattern: str, key: str, p) -> int | None:
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 1:
        raise ValueError(f"bitflip rule {pattern!r}: {key} must be a probability in (0, 1) or None, got {p!r}")
    halves = find_nearest_prob_n_halves(float(p))
    if halves > MAX_HALVES:
        raise ValueError(
            f"bitflip rule {pattern!r}: {key}={p!r} is below the smallest supported flip probability "
            f"0.5**{MAX_HALVES} = {0.5**MAX_HALVES:.3g}"
        )
    return halves


def _threshold(pattern: str, key: str, t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or t < 0:
        raise ValueError(f"bitflip rule {pattern!r}: {key} must be a number >= 0 or None, got {t!r}")
    return float(t)


def _seed(pattern: str, key: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"bitflip rule {pattern!r}: {key} must be an int in [0, 2**31 - 8), got {seed!r}")
    return int(seed)
