"""Bitflip settings from a file: NewComputeBench's regex rules, or a training config's
``[bitflip]`` section, read into one ``BitflipConfig``. The one reader that evaluation and
the torch bridge share (training reads its whole config with ``jaxflip.train``).

Two file forms (TOML or YAML, by suffix), told apart by a top-level ``bitflip`` table:

* rules: the top level maps layer-name regexes (and ``default``) to settings, as
  NewComputeBench's YAML configs do (``jaxflip.bitflip.rules``). TOML has no null: write a
  skipped pattern as ``"none"`` (or as an empty table, which flips nothing).
* section: a ``[bitflip]`` table with ``BitflipConfig``'s fields (other tables, such as a
  whole training config's, are ignored).
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml

from jaxflip.bitflip.config import SECTION, BitflipConfig


def read_bitflip_config(path: str | Path) -> BitflipConfig:
    """The ``BitflipConfig`` of a rules file or of a file with a ``[bitflip]`` section (see
    the module's doc). Raises ``ValueError`` naming the file on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bitflip config {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot parse: {' '.join(str(error).split())}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: expected a mapping of bitflip rules or a [{SECTION}] table")
    try:
        return BitflipConfig.from_mapping(raw[SECTION]) if SECTION in raw else BitflipConfig(rules=dict(raw))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def load_bitflip_config(path: str | Path, *, layer_names: Collection[str] | None = None
                        ) -> tuple[dict, str, int]:
    """``(rules, seed_mode, base_seed)`` of ``read_bitflip_config(path)``, the rules in
    NewComputeBench's form (``BitflipConfig.rule_mapping``), e.g. for ``apply_bitflip_rules``
    or NewComputeBench's own transform."""
    config = read_bitflip_config(path)
    return config.rule_mapping(layer_names), config.resolved_seed_mode, config.resolved_base_seed
