"""Running the points: the point store (one JSON per finished point, reused by a rerun), the
seeds, and the loop over points and seeds."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxflip.bitflip import BitFlipLinear, RuleTable, apply_rule_table, named_linears
from jaxflip.bitflip.seeds import SEED_NAMES
from jaxflip.eval.perplexity import perplexity
from jaxflip.eval.report import write_json
from jaxflip.eval.sweep.points import CLEAN, SweepPoint
from jaxflip.models import generate


@dataclass(frozen=True)
class Samples:
    """Greedy continuations of ``prompts`` for every point (the coherence check)."""

    tokenizer: object
    prompts: tuple[str, ...]
    max_new_tokens: int

    def settings(self) -> dict:
        return {"prompts": list(self.prompts), "max_new_tokens": self.max_new_tokens}

    def texts(self, model) -> list[str]:
        texts = []
        for prompt in self.prompts:
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            tokens = generate(model, jnp.asarray([prompt_ids], jnp.int32), self.max_new_tokens,
                              eos_token_id=self.tokenizer.eos_token_id)
            texts.append(self.tokenizer.decode([int(t) for t in np.asarray(tokens[0, len(prompt_ids):])],
                                               skip_special_tokens=True))
        return texts


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples as lists), for comparing with a stored record."""
    return json.loads(json.dumps(value))


class PointStore:
    """The finished points of one sweep folder: ``points/NAME.json`` each, holding the
    evaluation ``settings`` and the point's config it was computed with; a record whose settings
    or config differ from the current ones is not reused."""

    def __init__(self, folder: str | Path, settings: dict):
        self.folder = Path(folder) / "points"
        self.settings = _jsonable(settings)

    def path(self, point: SweepPoint) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9._=^+-]", "_", point.name) + ".json")

    def load(self, point: SweepPoint) -> dict:
        """The point's record so far: what a matching stored record holds, else nothing yet."""
        fresh = {"name": point.name, "component": point.component, "value": point.value,
                 "settings": self.settings, "bitflip": _jsonable(dataclasses.asdict(point.config)), "seeds": {}}
        path = self.path(point)
        if not path.is_file():
            return fresh
        stored = json.loads(path.read_text())
        if stored.get("settings") != fresh["settings"] or stored.get("bitflip") != fresh["bitflip"]:
            return fresh
        # JSON has no NaN: write_json stored a non-finite loss as null
        stored["seeds"] = {seed: {key: math.nan if value is None else value for key, value in result.items()}
                           for seed, result in stored["seeds"].items()}
        return stored

    def save(self, point: SweepPoint, record: dict) -> None:
        write_json(self.path(point), record)


def point_seeds(point: SweepPoint, seeds: Sequence[int]) -> list[int]:
    """The seeds a point runs: all, or the first one for the clean model (no flips to seed)."""
    return list(seeds[:1]) if point.component == CLEAN else list(seeds)


def set_starting_seeds(linears: Mapping[str, BitFlipLinear], table: RuleTable) -> None:
    """The starting seeds of ``table`` on Linears whose flips ``apply_rule_table`` set already,
    as host int32 values: the compiled forward takes them as arguments, copied in the call.
    ``configure``'s eager device scalars cost about 0.1 ms each, four per Linear: 80 ms per seed
    at aixsim-60M's 155 Linears on the 2-core VM (these host values: 4 ms), the order of a
    GPU forward of 16 x 2048 tokens."""
    for row in table:
        for name, seed in zip(SEED_NAMES, row.seeds):
            getattr(linears[row.layer], name).set_value(np.int32(seed))


def run_points(model, windows: np.ndarray, batch_size: int, points: Sequence[SweepPoint], seeds: Sequence[int],
               store: PointStore, samples: Samples | None = None) -> dict[str, dict]:
    """Every point under every seed (what ``store`` holds already is skipped), each point saved
    to ``store`` once all its seeds are done; returns each point's record by name."""
    linears = named_linears(model)
    layer_names = list(linears)
    records = {point.name: store.load(point) for point in points}
    missing = {point.name: [seed for seed in point_seeds(point, seeds) if str(seed) not in records[point.name]["seeds"]]
               for point in points}
    with tqdm(total=sum(map(len, missing.values())), desc="sweep", unit="eval") as progress:
        for point in points:
            record = records[point.name]
            wants_samples = samples is not None and record.get("samples", {}).get("settings") != samples.settings()
            if not missing[point.name] and not wants_samples:
                continue
            progress.set_postfix_str(point.name)
            apply_rule_table(model, point.config.match(layer_names))  # the point's flips; seeds set per seed
            for seed in missing[point.name]:
                # the seeds are state, not part of the compiled forward: only a point's first seed compiles
                set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seed).match(layer_names))
                row = perplexity(model, windows, batch_size, point.name, progress_bar=False)
                record["seeds"][str(seed)] = {"loss": row.loss, "perplexity": row.perplexity}
                progress.update(1)
            if wants_samples:
                set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seeds[0]).match(layer_names))
                record["samples"] = {"settings": samples.settings(), "seed": seeds[0], "texts": samples.texts(model)}
            store.save(point, record)
    return records
