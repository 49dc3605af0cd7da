"""The bitflip settings: one dataclass, checked once when it is built, for training's
``[bitflip]`` section, the eval commands' ``--bitflip-config`` and the torch bridge.

The fields are those of NewComputeBench's 70B tutorial config::

    [bitflip]
    w_p_exp = 1.52587890625e-05      # 0.5^16; x_p_exp, x_p_frac, w_p_frac alike
    w_zero_out_t = 256.0             # and x_zero_out_t
    base_seed = 0                    # set: independent per-layer seeds
    skip_patterns = ["lm_head"]      # layer-name substrings left alone

plus ``enable`` (false: no flips), ``exact`` (false: sampled flips, the same distribution
drawn cheaper, ``jaxflip.kernels_pallas.sampled``), ``seed_mode`` and ``rules`` (NewComputeBench's regex rules,
``jaxflip.bitflip.rules``, which replace the probability, threshold and skip fields). The
probabilities and thresholds become a ``default`` rule and each skip substring a skipping
rule; either way the rules are parsed once, here, into the ``RuleSet`` that ``match`` and
``apply`` use.

The op's limits (``MAX_HALVES``, ``SEED_LIMIT``) and the probability <-> halves mapping are
re-exported here: they are defined beside the op (``jaxflip.kernels_pallas.limits``), which
checks them and cannot import this package (which imports the op); code above the op uses
these names.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from flax import nnx

from jaxflip.bitflip.linear import LM_HEAD, TensorFlip, named_linears
from jaxflip.bitflip.rules import (DEFAULT, PROBABILITY_KEYS, SEED_MODES, THRESHOLD_KEYS, RuleSet, RuleTable,
                                   apply_rule_table, match_rules, parse_rules)
from jaxflip.kernels_pallas.limits import (MAX_HALVES, SEED_LIMIT, calculate_flip_probability, check_seed,
                                           find_nearest_prob_n_halves, flip_halves)

__all__ = ["MAX_HALVES", "SEED_LIMIT", "BitflipConfig", "calculate_flip_probability", "check_seed",
           "find_nearest_prob_n_halves", "flip_halves", "parse_none"]

SECTION = "bitflip"
NONE_STRINGS = ("none", "null")
NO_SEEDS = (0, 0, 0, 0)


def parse_none(value):
    """None for ``"none"`` or ``"null"`` (any case: TOML has no null), else ``value``."""
    return None if isinstance(value, str) and value.lower() in NONE_STRINGS else value


@dataclass(frozen=True)
class BitflipConfig:
    """How a model's Linear layers flip. Built from a training config (``[bitflip]``), a file
    (``jaxflip.bitflip.rules_file.read_bitflip_config``) or in code; a bad field raises
    ``ValueError`` naming it (``bitflip.x_p_exp must be a probability in (0, 1) or None, got 2``)."""

    enable: bool = True
    w_p_exp: float | None = None
    w_p_frac: float | None = None
    w_zero_out_t: float | None = None
    x_p_exp: float | None = None
    x_p_frac: float | None = None
    x_zero_out_t: float | None = None
    base_seed: int | None = None  # set: independent per-layer seeds; None: mase-triton's (all 0)
    seed_mode: str | None = None  # "reference" or "independent"; None: independent when base_seed is set
    skip_patterns: list[str] = field(default_factory=lambda: [LM_HEAD])  # layer-name substrings left alone
    rules: dict | None = None  # NewComputeBench regex rules; replaces the fields above when given
    exact: bool = True  # mase-triton's flips bit for bit; false: sampled, the same distribution, cheaper

    def __post_init__(self):
        for flag in ("enable", "exact"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{SECTION}.{flag} must be true or false, got {getattr(self, flag)!r}")
        x_flip, w_flip = (TensorFlip.from_probabilities(getattr(self, f"{t}_p_exp"), getattr(self, f"{t}_p_frac"),
                                                        getattr(self, f"{t}_zero_out_t"), name=f"{SECTION}.{t}_")
                          for t in "xw")
        if self.base_seed is not None and (isinstance(self.base_seed, bool) or not isinstance(self.base_seed, int)
                                           or self.base_seed < 0):
            raise ValueError(f"{SECTION}.base_seed must be an integer >= 0 or None, got {self.base_seed!r}")
        if self.seed_mode is not None and self.seed_mode not in SEED_MODES:
            raise ValueError(f"{SECTION}.seed_mode must be one of {SEED_MODES}, got {self.seed_mode!r}")
        if not isinstance(self.skip_patterns, (list, tuple)):
            raise ValueError(f"{SECTION}.skip_patterns must be a list of layer-name substrings, "
                             f"got {self.skip_patterns!r}")
        for substring in self.skip_patterns:
            if not isinstance(substring, str) or not substring:
                raise ValueError(f"{SECTION}.skip_patterns entries must be non-empty strings, got {substring!r}")
        if self.rules is None:
            skips = {_skip_regex(s): re.compile(_skip_regex(s)) for s in self.skip_patterns}
            rule_set = RuleSet({**dict.fromkeys(skips), DEFAULT: (x_flip, w_flip, NO_SEEDS)}, skips)
        else:
            try:
                rule_set = parse_rules(_rules_without_none_strings(self.rules))
            except ValueError as error:
                raise ValueError(f"{SECTION}.rules: {error}") from None
        object.__setattr__(self, "_rule_set", rule_set)  # not a field: to_dict and comparisons leave it out

    @classmethod
    def from_mapping(cls, section: Mapping) -> BitflipConfig:
        """From a ``[bitflip]`` table as a TOML or YAML file holds it (``"none"`` strings are None;
        ``skip_patterns = "none"`` skips no layer)."""
        if not isinstance(section, Mapping):
            raise ValueError(f"[{SECTION}] must be a table, got {section!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(known), key=str)
        if unknown:
            raise ValueError(f"[{SECTION}] has unknown field(s) {unknown}; known: {', '.join(known)}")
        values = {key: parse_none(value) for key, value in section.items()}
        if "skip_patterns" in values and values["skip_patterns"] is None:  # TOML's way to say "skip nothing"
            values["skip_patterns"] = []
        return cls(**values)

    @property
    def resolved_seed_mode(self) -> str:
        """``seed_mode``, by default ``"independent"`` when ``base_seed`` is set, else ``"reference"``."""
        return self.seed_mode or ("reference" if self.base_seed is None else "independent")

    @property
    def resolved_base_seed(self) -> int:
        return 0 if self.base_seed is None else self.base_seed

    def rule_set(self, layer_names: Collection[str] | None = None) -> RuleSet:
        """The parsed rules (none when ``enable`` is false). Given the model's ``layer_names``, a
        skip substring that names none of them is dropped with a warning (the 70B config skips
        torchtitan's ``output``, which HF names ``lm_head``), since a rule must match a layer."""
        if not self.enable:
            return RuleSet({}, {})
        unused = [] if self.rules is not None else self._unused_skips(layer_names)
        if not unused:
            return self._rule_set
        kept = {pattern: rule for pattern, rule in self._rule_set.settings.items() if pattern not in unused}
        return RuleSet(kept, {pattern: self._rule_set.patterns[pattern] for pattern in kept if pattern != DEFAULT})

    def match(self, layer_names: Collection[str]) -> RuleTable:
        """Each layer's flips and starting seeds (``jaxflip.bitflip.match_rules``)."""
        return match_rules(list(layer_names), self.rule_set(layer_names), self.resolved_seed_mode,
                           self.resolved_base_seed)

    def apply(self, model: nnx.Module) -> RuleTable:
        """Configure every ``BitFlipLinear`` of ``model`` (in place; seeds start afresh)."""
        return apply_rule_table(model, self.match(named_linears(model)), self.exact)

    def rule_mapping(self, layer_names: Collection[str] | None = None) -> dict:
        """The rules in NewComputeBench's form (``{regex: settings or None}``), e.g. for its own
        transform; ``layer_names`` as in ``rule_set``."""
        if not self.enable:
            return {}
        if self.rules is not None:
            return _rules_without_none_strings(self.rules)
        unused = self._unused_skips(layer_names)
        rules = {_skip_regex(s): None for s in self.skip_patterns if _skip_regex(s) not in unused}
        rules[DEFAULT] = {key: getattr(self, key) for key in PROBABILITY_KEYS + THRESHOLD_KEYS}
        return rules

    def _unused_skips(self, layer_names: Collection[str] | None) -> list[str]:
        """The regexes of skip substrings that name none of ``layer_names``, each warned of."""
        if layer_names is None:
            return []
        unused = []
        for substring in self.skip_patterns:
            if not any(substring in name for name in layer_names):
                warnings.warn(f"{SECTION}.skip_patterns entry {substring!r} names no layer of this model; ignored",
                              stacklevel=3)
                unused.append(_skip_regex(substring))
        return unused


def _skip_regex(substring: str) -> str:
    """The rule regex of a skip substring: any layer name containing it."""
    return f".*{re.escape(substring)}.*"


def _rules_without_none_strings(rules):
    """A rules mapping with TOML's ``"none"`` strings as None (a skipped pattern, an unset setting)."""
    if not isinstance(rules, Mapping):
        return rules  # parse_rules says what is wrong with it
    return {pattern: ({key: parse_none(value) for key, value in rule.items()} if isinstance(rule, Mapping)
                      else parse_none(rule))
            for pattern, rule in rules.items()}
