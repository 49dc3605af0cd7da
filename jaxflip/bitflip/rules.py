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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flax import nnx

from jaxflip.bitflip.linear import LM_HEAD, Armed, TensorFlip, named_linears
from jaxflip.bitflip.seeds import SEED_NAMES, independent_seed
from jaxflip.kernels_pallas.limits import check_seed

PROBABILITY_KEYS = ("x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac")
THRESHOLD_KEYS = ("x_zero_out_t", "w_zero_out_t")
RULE_KEYS = PROBABILITY_KEYS + THRESHOLD_KEYS + SEED_NAMES
DEFAULT = "default"
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


# one rule's flips and starting seeds; None: the rule skips its layers
Rule = tuple[TensorFlip, TensorFlip, tuple[int, int, int, int]] | None


@dataclass(frozen=True)
class RuleSet:
    """Rules parsed and checked (``parse_rules``): each pattern's ``Rule`` in order, ``default``
    included, and each pattern but ``default`` compiled. ``match_rules`` takes one as it
    takes the mapping it came from."""

    settings: dict[str, Rule]
    patterns: dict[str, re.Pattern]


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


def apply_bitflip_rules(model: nnx.Module, rules: Mapping | RuleSet, seed_mode: str = "reference",
                        base_seed: int = 0) -> RuleTable:
    """Configure every ``BitFlipLinear`` of ``model`` from ``rules`` (in place) and return
    which layer got which rule (see ``match_rules``)."""
    return apply_rule_table(model, match_rules(list(named_linears(model)), rules, seed_mode, base_seed))


def apply_rule_table(model: nnx.Module, table: RuleTable, exact: bool = True) -> RuleTable:
    """Configure the ``BitFlipLinear`` of each row of ``table`` (``match_rules`` on ``model``'s
    layer names) as the row says, with exact or (``exact=False``) sampled flips; returns
    ``table``."""
    linears = named_linears(model)
    shared = x_seeds_shared(table)
    for row in table:
        linears[row.layer].configure(row.x_flip, row.w_flip, row.seeds, x_seeds_shared=row.layer in shared,
                                     exact=exact)
    return table


def arm_for_tables(model: nnx.Module, tables: Iterable[RuleTable], exact: bool = True) -> None:
    """Arm each ``BitFlipLinear`` of ``model`` for everything any of ``tables`` (``match_rules``
    on its layer names) sets it to, and no more: ``apply_rule_table`` with any of them then
    changes only run-time settings and seeds, so a whole campaign (grid points, per-layer
    cells, seeds) runs one compiled forward. A Linear no table flips is disarmed."""
    linears = named_linears(model)
    armed = dict.fromkeys(linears, (Armed(exact=exact), Armed(exact=exact)))
    for table in tables:
        for row in table:
            x_armed, w_armed = armed[row.layer]
            armed[row.layer] = (x_armed | Armed.needed_by(row.x_flip, exact),
                                w_armed | Armed.needed_by(row.w_flip, exact))
    for name, (x_armed, w_armed) in armed.items():
        linears[name].arm(x_armed, w_armed)


def x_seeds_shared(table: RuleTable) -> set[str]:
    """The layers of ``table`` whose input flip starts as that of every other Linear of the same
    parent module with the same ``x_flip`` (one at least): the same input seeds, so reading the
    same tensor they flip it alike (``jaxflip.bitflip.linear.flip_shared_input``)."""
    by_flip: dict[tuple[str, TensorFlip], list[RuleRow]] = {}
    for row in table:
        if row.x_flip.enabled:
            by_flip.setdefault((row.layer.rpartition(".")[0], row.x_flip), []).append(row)
    return {row.layer for rows in by_flip.values()
            if len(rows) > 1 and len({row.seeds[:2] for row in rows}) == 1 for row in rows}


def match_rules(layer_names: list[str], rules: Mapping | RuleSet, seed_mode: str = "reference",
                base_seed: int = 0) -> RuleTable:
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
    rule_set = rules if isinstance(rules, RuleSet) else parse_rules(rules)
    patterns = rule_set.patterns
    for pattern, regex in patterns.items():
        if not any(regex.fullmatch(name) for name in layer_names):
            raise ValueError(
                f"bitflip rule {pattern!r} matches no layer (patterns must match a whole layer name); "
                f"layers are: {', '.join(layer_names)}"
            )

    table = RuleTable()
    for name in layer_names:
        pattern = next((p for p, regex in patterns.items() if regex.fullmatch(name)), None)
        if pattern is None and name != LM_HEAD and DEFAULT in rule_set.settings:
            pattern = DEFAULT
        rule = rule_set.settings.get(pattern)
        if rule is None:
            x_flip, w_flip, seeds = TensorFlip(), TensorFlip(), (0, 0, 0, 0)
        else:
            x_flip, w_flip, seeds = rule
            if seed_mode == "independent":
                seeds = tuple(independent_seed(base_seed, name, seed_name) for seed_name in SEED_NAMES)
        table.append(RuleRow(name, pattern, x_flip, w_flip, seeds))
    return table


def parse_rules(rules: Mapping) -> RuleSet:
    """The rules checked and parsed: each rule's ``(x_flip, w_flip, seeds)`` (None: skip) and
    each pattern but ``default`` compiled. Raises ``ValueError`` as ``match_rules`` does, less
    the check that needs the layer names."""
    if not isinstance(rules, Mapping):
        raise ValueError(f"bitflip rules must be a mapping from layer-name regex to settings, got {type(rules).__name__}")
    settings = {pattern: _parse_rule(pattern, rule) for pattern, rule in rules.items()}
    patterns = {pattern: _compile(pattern) for pattern in rules if pattern != DEFAULT}
    return RuleSet(settings, patterns)


def _compile(pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"bitflip rule keys must be layer-name regexes (str), got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"bitflip rule {pattern!r} is not a valid regex: {error}") from None


def _parse_rule(pattern: str, rule) -> Rule:
    """``(x_flip, w_flip, seeds)`` of one rule, or None for a rule that skips its layers."""
    if rule is None:
        return None
    if not isinstance(rule, Mapping):
        raise ValueError(f"bitflip rule {pattern!r} must map to a dict of settings or None, got {rule!r}")
    unknown = sorted(set(rule) - set(RULE_KEYS), key=str)
    if unknown:
        raise ValueError(f"bitflip rule {pattern!r} has unknown key(s) {unknown}; allowed keys: {', '.join(RULE_KEYS)}")
    try:
        x_flip, w_flip = (TensorFlip.from_probabilities(rule.get(f"{t}_p_exp"), rule.get(f"{t}_p_frac"),
                                                        rule.get(f"{t}_zero_out_t"), name=f"{t}_") for t in "xw")
        seeds = tuple(check_seed(key, rule.get(key, 0)) for key in SEED_NAMES)
    except ValueError as error:
        raise ValueError(f"bitflip rule {pattern!r}: {error}") from None
    return x_flip, w_flip, seeds
