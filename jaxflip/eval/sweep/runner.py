"""Running the points: the point store (one JSON per finished point, reused by a rerun), the
seeds, and the loop over points and seeds."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxflip.bitflip import BitFlipLinear, RuleTable, apply_rule_table, arm_for_tables, named_linears
from jaxflip.bitflip.seeds import SEED_NAMES
from jaxflip.cli import one_line
from jaxflip.eval.perplexity import perplexity
from jaxflip.eval.report import write_json
from jaxflip.eval.sweep.points import CLEAN, SweepPoint, held_seeds, point_seeds
from jaxflip.eval.sweep.report import clean_perplexity, ratio_interval_width
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
        try:
            stored = json.loads(path.read_text())
            if stored.get("settings") != fresh["settings"] or stored.get("bitflip") != fresh["bitflip"]:
                return fresh
            # JSON has no NaN: write_json stored a non-finite loss as null
            stored["seeds"] = {seed: {key: math.nan if value is None else value for key, value in result.items()}
                               for seed, result in stored["seeds"].items()}
        except (ValueError, AttributeError, KeyError, TypeError) as error:  # not JSON, or not a record's shape
            raise ValueError(f"{path}: not a readable sweep point record ({one_line(error)}); move it away to "
                             f"compute the point again") from None
        return stored

    def save(self, point: SweepPoint, record: dict) -> None:
        write_json(self.path(point), record)


def set_starting_seeds(linears: Mapping[str, BitFlipLinear], table: RuleTable) -> None:
    """The starting seeds of ``table`` on Linears whose flips ``apply_rule_table`` set already,
    as host int32 values: the compiled forward takes them as arguments, copied in the call.
    ``configure``'s eager device scalars cost about 0.1 ms each, four per Linear: 80 ms per seed
    at aixsim-60M's 155 Linears on the 2-core VM (these host values: 4 ms), the order of a
    GPU forward of 16 x 2048 tokens."""
    for row in table:
        for name, seed in zip(SEED_NAMES, row.seeds):
            getattr(linears[row.layer], name).set_value(np.asarray(seed, np.int32))


def prepare_points(model, layer_names: Sequence[str], points: Sequence[SweepPoint]) -> dict[str, RuleTable]:
    """The one place where the model is prepared for every point, called once before any point
    runs: each point's rule table, by point name, for the run loop (which sets it per point),
    and every Linear armed for everything any point flips (``arm_for_tables``), so that setting
    a point changes only run-time state: one compiled forward serves every point and seed, the
    clean one included (its tensors armed but off flip nothing and run no Philox)."""
    modes = {point.config.exact for point in points}
    if len(modes) > 1:
        raise ValueError("sweep points mix exact and sampled flips (bitflip.exact); a sweep runs one mode")
    tables = {point.name: point.config.match(layer_names) for point in points}
    arm_for_tables(model, tables.values(), exact=modes.pop() if modes else True)
    return tables


def seeds_wanted(point: SweepPoint, record: Mapping, seeds: Sequence[int], ci_width: float | None,
                 clean_perplexity: float | None) -> int:
    """How many of the point's seeds (its first ones, in order) it should hold now. Without
    ``ci_width``: all. With it: two to start (the fewest an interval needs), then one more per
    round while the full width of the 95% interval of its perplexity ratio to clean is ``ci_width``
    or more, up to all of ``seeds``; a point stops at the first non-finite perplexity (its
    interval is undefined; more seeds would not define it)."""
    available = point_seeds(point, seeds)
    if ci_width is None or point.component == CLEAN:
        return len(available)
    held = held_seeds(record, available)
    if len(held) < 2:
        return min(2, len(available))
    perplexities = [record["seeds"][str(seed)]["perplexity"] for seed in held]
    if not all(map(math.isfinite, perplexities)) or ratio_interval_width(perplexities, clean_perplexity) < ci_width:
        return len(held)
    return min(len(held) + 1, len(available))


def run_points(model, windows: np.ndarray, batch_size: int, points: Sequence[SweepPoint], seeds: Sequence[int],
               store: PointStore, samples: Samples | None = None, *, ci_width: float | None = None,
               unsaved: Collection[str] = ()) -> dict[str, dict]:
    """Every point under the seeds that ``seeds_wanted`` asks of it (what ``store`` holds already
    is reused), in rounds: a round visits the points still wanting seeds in order, runs the
    missing ones and saves the point to ``store`` (but the points named in ``unsaved``). Without
    ``ci_width`` the first round runs every seed; with it each round adds a seed to the points
    whose interval is still too wide, so the work goes where it is needed (the clean point,
    first, gives the ratios). Returns each point's record by name."""
    if ci_width is not None and not any(point.component == CLEAN for point in points):
        raise ValueError("--ci-width needs the clean point: the interval is of the ratio to the clean perplexity")
    linears = named_linears(model)
    layer_names = list(linears)
    tables = prepare_points(model, layer_names, points)
    records = {point.name: store.load(point) for point in points}

    def unheld(point: SweepPoint) -> int:
        return sum(str(seed) not in records[point.name]["seeds"] for seed in point_seeds(point, seeds))

    reused = {point.name: len(point_seeds(point, seeds)) - unheld(point) for point in points}
    if any(reused.values()):  # a rerun over the same folder: say what it does not compute again
        print(f"resumed: {sum(map(bool, reused.values()))} of {len(points)} points found in {store.folder}, "
              f"{sum(reused.values())} evaluations reused", flush=True)

    # at most every seed not held yet; a point that stops early takes its rest off the total
    with tqdm(total=sum(map(unheld, points)), desc="sweep", unit="eval") as progress:
        pending = list(points)
        while pending:
            still_running = []
            for point in pending:
                record = records[point.name]
                wanted = seeds_wanted(point, record, seeds, ci_width, clean_perplexity(points, records))
                missing = [seed for seed in point_seeds(point, seeds)[:wanted] if str(seed) not in record["seeds"]]
                wants_samples = samples is not None and record.get("samples", {}).get("settings") != samples.settings()
                if not missing and not wants_samples:
                    progress.total -= unheld(point)
                    progress.refresh()
                    continue
                progress.set_postfix_str(point.name)
                apply_rule_table(model, tables[point.name], point.config.exact)  # its flips; seeds set per seed
                for seed in missing:
                    # the seeds are run-time state, not part of the compiled program: a new seed never recompiles
                    set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seed).match(layer_names))
                    row = perplexity(model, windows, batch_size, point.name, progress_bar=False)
                    record["seeds"][str(seed)] = {"loss": row.loss, "perplexity": row.perplexity}
                    progress.update(1)
                if wants_samples:
                    set_starting_seeds(linears, dataclasses.replace(point.config, base_seed=seeds[0]).match(layer_names))
                    record["samples"] = {"settings": samples.settings(), "seed": seeds[0], "texts": samples.texts(model)}
                if point.name not in unsaved:
                    store.save(point, record)
                still_running.append(point)
            pending = still_running
    return records
