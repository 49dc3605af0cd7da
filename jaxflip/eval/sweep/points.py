"""The sweep's points: ``--grid`` parsed, the grid and per-layer points, the clean point, the
seeds a point may run, and ``--shard``'s split of the points."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jaxflip.bitflip import BitflipConfig, RuleTable, calculate_flip_probability
from jaxflip.bitflip.rules import PROBABILITY_KEYS, THRESHOLD_KEYS
from jaxflip.kernels_pallas.limits import find_nearest_prob_n_halves

FLIP_FIELDS = PROBABILITY_KEYS + THRESHOLD_KEYS
PER_LAYER_TARGETS = ("linear", "block", "type")
CLEAN = "clean"


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid``: the flip fields it sets (all to the same value) and its values (None:
    that field off)."""

    fields: tuple[str, ...]
    values: tuple[float | None, ...]

    @property
    def name(self) -> str:
        return "+".join(self.fields)


@dataclass(frozen=True)
class SweepPoint:
    """One flip setting of the sweep: ``name`` (unique, also its file's), the ``component`` it
    belongs to (a grid axis's fields, a per-layer target, or ``clean``), its ``value`` on that
    component (the grid value, or the per-layer bit group) and its config (seeds set per run)."""

    name: str
    component: str
    value: float | str | None
    config: BitflipConfig


def parse_grid(text: str) -> GridAxis:
    """A ``--grid FIELDS=VALUES`` (see the module's doc); values are checked when the point
    configs are built."""
    fields_text, equals, values_text = text.partition("=")
    if not equals or not fields_text or not values_text:
        raise ValueError(f"--grid {text!r}: expected FIELDS=VALUES, e.g. x_p_frac=0.5^6:0.5^16")
    fields = tuple(fields_text.split("+"))
    for field in fields:
        if field not in FLIP_FIELDS:
            raise ValueError(f"--grid {text!r}: unknown flip field {field!r}; flip fields: {', '.join(FLIP_FIELDS)}")
    if len({field in PROBABILITY_KEYS for field in fields}) > 1:
        raise ValueError(f"--grid {text!r}: probabilities and thresholds cannot share one axis")
    if ":" in values_text:
        if fields[0] not in PROBABILITY_KEYS:
            raise ValueError(f"--grid {text!r}: a 0.5^A:0.5^B range is for probabilities; list thresholds with commas")
        parts = values_text.split(":")
        halves = [_halves(text, part) for part in parts[:2]]
        step = _step(text, parts[2]) if len(parts) == 3 else 1
        if len(parts) > 3:
            raise ValueError(f"--grid {text!r}: a range is 0.5^A:0.5^B or 0.5^A:0.5^B:STEP")
        direction = 1 if halves[1] >= halves[0] else -1
        values = tuple(0.5**k for k in range(halves[0], halves[1] + direction, direction * step))
    else:
        values = tuple(_value(text, item) for item in values_text.split(","))
    return GridAxis(fields, values)


def _halves(text: str, item: str) -> int:
    match = re.fullmatch(r"0\.5\^(\d+)", item.strip())
    if match is None:
        raise ValueError(f"--grid {text!r}: range ends must be 0.5^K, got {item!r}")
    return int(match.group(1))


def _step(text: str, item: str) -> int:
    if not item.strip().isdigit() or int(item) < 1:
        raise ValueError(f"--grid {text!r}: a range's STEP must be an integer >= 1, got {item!r}")
    return int(item)


def _value(text: str, item: str) -> float | None:
    item = item.strip()
    if item.lower() in ("none", "null"):
        return None
    if re.fullmatch(r"0\.5\^\d+", item):
        return 0.5**_halves(text, item)
    try:
        return float(item)
    except ValueError:
        raise ValueError(f"--grid {text!r}: {item!r} is not a number, 0.5^K or none") from None


def format_value(field: str, value: float | None) -> str:
    """A grid value as its point's name shows it: a probability as the ``0.5^K`` it snaps to."""
    if value is None:
        return "none"
    if field in PROBABILITY_KEYS and 0 < value < 1:
        return f"0.5^{find_nearest_prob_n_halves(value)}"
    return f"{value:g}"


def with_settings(base: BitflipConfig, settings: Mapping[str, float | None]) -> BitflipConfig:
    """``base`` with these flip fields set: the fields themselves, or, for a base of regex
    rules, the same keys in every rule that flips. Checked by ``BitflipConfig`` (the error
    names the field)."""
    if base.rules is None:
        return dataclasses.replace(base, **settings)
    rules = {pattern: {**rule, **settings} if _flips(rule) else rule for pattern, rule in base.rule_mapping().items()}
    return dataclasses.replace(base, rules=rules)


def _flips(rule) -> bool:
    return isinstance(rule, Mapping) and any(rule.get(key) is not None for key in FLIP_FIELDS)


def grid_points(base: BitflipConfig, axes: Sequence[GridAxis]) -> list[SweepPoint]:
    """The points of the grid axes in order, each axis varied alone; two values that snap to
    the same flips are one point."""
    points = {}
    for axis in axes:
        for value in axis.values:
            name = f"{axis.name}={format_value(axis.fields[0], value)}"
            try:
                config = with_settings(base, dict.fromkeys(axis.fields, value))
            except ValueError as error:
                raise ValueError(f"--grid {name}: {error}") from None
            points.setdefault(name, SweepPoint(name, axis.name, value, config))
    return list(points.values())


def per_layer_target(layer: str, target: str) -> str:
    """What ``--per-layer target`` flips a layer with: the layer itself, its decoder block
    (``model.layers.3``) or its projection in every block (``mlp.up_proj``)."""
    match = re.fullmatch(r"(.*layers\.\d+)\.(.+)", layer)
    if target == "linear" or match is None:
        return layer
    return match.group(1) if target == "block" else match.group(2)


def per_layer_points(base: BitflipConfig, table: RuleTable, target: str, groups: Sequence[str]) -> list[SweepPoint]:
    """One point per target and bit group that the base flips: the group alone on the target's
    layers, at each layer's own base setting (with its tensor's zero-out threshold)."""
    targets: dict[str, list] = {}
    for row in table:
        if row.flipped:
            targets.setdefault(per_layer_target(row.layer, target), []).append(row)
    points = []
    for name, rows in targets.items():
        for group in groups:
            tensor, bits = group[0], group.rsplit("_", 1)[1]
            rules = {}
            for row in rows:
                flip = getattr(row, f"{tensor}_flip")
                halves = getattr(flip, f"{bits}_halves")
                if halves is not None:
                    rules[re.escape(row.layer)] = {group: calculate_flip_probability(halves),
                                                   f"{tensor}_zero_out_t": flip.zero_out_t}
            if rules:
                points.append(SweepPoint(f"{name} {group}", name, group, dataclasses.replace(base, rules=rules)))
    return points


def clean_point(base: BitflipConfig) -> SweepPoint:
    return SweepPoint(CLEAN, CLEAN, None, dataclasses.replace(base, enable=False))


def point_seeds(point: SweepPoint, seeds: Sequence[int]) -> list[int]:
    """The seeds a point may run, in order: all, or the first one for the clean model (no flips to seed)."""
    return list(seeds[:1]) if point.component == CLEAN else list(seeds)


def held_seeds(record: Mapping, seeds: Sequence[int]) -> list[int]:
    """The leading ``seeds`` that a point's record holds results for: the seeds it uses (a
    ``--ci-width`` run adds them in order)."""
    held = []
    for seed in seeds:
        if str(seed) not in record["seeds"]:
            break
        held.append(seed)
    return held


@dataclass(frozen=True)
class Shard:
    """``--shard K/N``: this process computes the K-th of N shares of the points (1 <= K <= N)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def points(self, points: Sequence[SweepPoint]) -> list[SweepPoint]:
        """This shard's share of the flipped ``points``: the i-th (from 0) goes to shard
        i % N + 1, so every point is in exactly one shard and neighbours on a curve (of similar
        cost) spread over the shards. It depends only on the point list, which every process of
        one command builds alike."""
        return [point for position, point in enumerate(points) if position % self.count == self.index - 1]


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 2/8 for the second of 8 shares of the points")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text}: K must be in 1..N, got {index} of {count}")
    return Shard(index, count)
