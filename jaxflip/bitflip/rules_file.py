"""Bitflip settings from a file: NewComputeBench's regex rules, or a training config's
``[bitflip]`` section. The one reader that evaluation and training share.

Two file forms (TOML or YAML, by suffix), told apart by a top-level ``bitflip`` table:

* rules: the top level maps layer-name regexes (and ``default``) to settings, as
  NewComputeBench's YAML configs do (``jaxflip.bitflip.rules``). TOML has no null: write a
  skipped pattern as ``"none"`` (or as an empty table, which flips nothing).
* section: a ``[bitflip]`` table (other tables, such as a whole training config's, are
  ignored) with the fields of the 70B tutorial's config::

      [bitflip]
      w_p_exp = 1.52587890625e-05      # 0.5^16; x_p_exp, x_p_frac, w_p_frac alike
      w_zero_out_t = 256.0             # and x_zero_out_t
      base_seed = 0                    # set: independent per-layer seeds
      skip_patterns = ["lm_head"]      # layer-name substrings left alone

  plus optionally ``enable`` (false: no flips), ``seed_mode`` and ``rules`` (a regex rule
  mapping that replaces the probability, threshold and skip fields).
"""

from __future__ import annotations

import re
import tomllib
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml

from jaxflip.bitflip.rules import DEFAULT, PROBABILITY_KEYS, SEED_MODES, THRESHOLD_KEYS, parse_rules

SECTION = "bitflip"
SETTING_KEYS = PROBABILITY_KEYS + THRESHOLD_KEYS
SECTION_KEYS = SETTING_KEYS + ("enable", "base_seed", "seed_mode", "skip_patterns", "rules")
NONE_STRINGS = ("none", "null")


def load_bitflip_config(path: str | Path, *, layer_names: Collection[str] | None = None
                        ) -> tuple[dict, str, int]:
    """``(rules, seed_mode, base_seed)`` for ``apply_bitflip_rules`` from a rules file or a file
    with a ``[bitflip]`` section (see the module docstring). ``layer_names``: see
    ``bitflip_section_to_rules``. Raises ``ValueError`` naming the file on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bitflip config {path} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: cannot parse: {error}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: expected a mapping of bitflip rules or a [{SECTION}] table")
    try:
        rules, seed_mode, base_seed = (bitflip_section_to_rules(raw[SECTION], layer_names=layer_names)
                                       if SECTION in raw else (_rules(raw), "reference", 0))
        parse_rules(rules)  # every rule's settings, checked before any model is at hand
        return rules, seed_mode, base_seed
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def bitflip_section_to_rules(section: Mapping, *, layer_names: Collection[str] | None = None
                             ) -> tuple[dict, str, int]:
    """``(rules, seed_mode, base_seed)`` from a ``[bitflip]`` section.

    The probabilities and thresholds become the ``default`` rule; each ``skip_patterns`` entry
    is a layer-name substring, as in the reference, and becomes a skipping rule. A substring
    may name no layer of this model (the 70B config skips torchtitan's ``output``, which HF
    names ``lm_head``); given the model's ``layer_names``, such entries are dropped with a
    warning, since ``apply_bitflip_rules`` rejects patterns that match nothing. ``seed_mode``
    defaults to ``"independent"`` when ``base_seed`` is set, else ``"reference"``.
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"[{SECTION}] must be a table, got {section!r}")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ValueError(f"[{SECTION}] has unknown field(s) {unknown}; known: {', '.join(SECTION_KEYS)}")
    base_seed = _none(section.get("base_seed"))
    seed_mode = _none(section.get("seed_mode")) or ("reference" if base_seed is None else "independent")
    if seed_mode not in SEED_MODES:
        raise ValueError(f"{SECTION}.seed_mode must be one of {SEED_MODES}, got {seed_mode!r}")
    base_seed = 0 if base_seed is None else base_seed
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"{SECTION}.base_seed must be an integer >= 0, got {base_seed!r}")
    if section.get("enable", True) is False:
        return {}, seed_mode, base_seed
    if section.get("rules") is not None:
        return _rules(section["rules"]), seed_mode, base_seed

    rules = {}
    for substring in section.get("skip_patterns") or ():
        if not isinstance(substring, str) or not substring:
            raise ValueError(f"{SECTION}.skip_patterns entries must be non-empty strings, got {substring!r}")
        if layer_names is not None and not any(substring in name for name in layer_names):
            warnings.warn(f"{SECTION}.skip_patterns entry {substring!r} names no layer of this model; ignored",
                          stacklevel=2)
            continue
        rules[f".*{re.escape(substring)}.*"] = None
    rules[DEFAULT] = {key: _none(section.get(key)) for key in SETTING_KEYS}
    return rules, seed_mode, base_seed


def _rules(raw) -> dict:
    """A rules mapping as read from a file, TOML's ``"none"`` strings turned into None."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"bitflip rules must map layer-name regexes to settings, got {raw!r}")
    return {pattern: ({key: _none(value) for key, value in rule.items()} if isinstance(rule, Mapping) else _none(rule))
            for pattern, rule in raw.items()}


def _none(value):
    return None if isinstance(value, str) and value.lower() in NONE_STRINGS else value
