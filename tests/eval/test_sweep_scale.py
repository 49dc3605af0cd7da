"""``sweep`` scaled out: ``--shard K/N`` splits the points over processes and a plain rerun
merges them; ``--ci-width`` runs seeds in rounds until each point's interval is narrow. Stub
evaluations (``runner.perplexity`` replaced) make the stopping rule exact; the tiny random Llama
of test_sweep.py checks the real runs."""

import csv
import json
import math

import numpy as np
import pytest
from test_sweep import BASE_TOML, run_sweep
from tiny_models import save_checkpoint, tiny_text_model

from jaxflip.bitflip import BitflipConfig
from jaxflip.eval.__main__ import main
from jaxflip.eval.perplexity import PerplexityRow
from jaxflip.eval.sweep import runner
from jaxflip.eval.sweep.points import Shard, grid_points, parse_grid

GRID = "x_p_exp=0.5^4:0.5^7"  # four points: shard 2/3 gets two of them, the others one


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(checkpoint, base config)``: a random tiny model and test_sweep.py's base flips."""
    folder = tmp_path_factory.mktemp("scale")
    _, model = tiny_text_model(np.random.default_rng())
    base = folder / "base.toml"
    base.write_text(BASE_TOML)
    return save_checkpoint(model, folder / "model"), base


def count_evaluations(monkeypatch) -> list[str]:
    """The condition of every evaluation from now on (they still run)."""
    calls = []
    perplexity = runner.perplexity

    def counted(model, windows, batch_size, condition, **kwargs):
        calls.append(condition)
        return perplexity(model, windows, batch_size, condition, **kwargs)

    monkeypatch.setattr(runner, "perplexity", counted)
    return calls


@pytest.mark.parametrize("count", [1, 2, 3, 7, 20])
def test_the_shards_partition_the_points(count):
    points = grid_points(BitflipConfig(x_p_exp=0.5**10), [parse_grid("x_p_exp=0.5^2:0.5^12"),
                                                            parse_grid("x_p_frac+w_p_frac=0.5^3:0.5^9:2")])
    shares = [Shard(index, count).points(points) for index in range(1, count + 1)]
    names = [point.name for share in shares for point in share]
    assert sorted(names) == sorted(point.name for point in points) and len(names) == len(set(names)) == len(points)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, "round robin: shares differ by one point at most"


def test_shard_runs_then_a_plain_rerun_merge_into_the_unsharded_table_computing_nothing(tiny, tmp_path, monkeypatch,
                                                                                           capsys):
    path, base = tiny
    whole = run_sweep(path, base, tmp_path / "whole", "--grid", GRID, "--seeds", "2")
    shared = tmp_path / "shared"
    calls = count_evaluations(monkeypatch)
    shard_names = {}
    for shard in ("2/3", "3/3", "1/3"):  # shard 1, the one that writes clean.json, last
        calls.clear()
        payload = run_sweep(path, base, shared, "--grid", GRID, "--seeds", "2", "--shard", shard)
        shard_names[shard] = [row["name"] for row in payload["points"][1:]]
        assert calls.count("clean") == 1, "every shard evaluates the clean model (no clean.json yet)"
        assert payload["files"] == {} and not (shared / "sweep.json").exists() and not (shared / "sweep.png").exists()
        assert "no table or plot written" in capsys.readouterr().out
        assert (shared / "points" / "clean.json").exists() == (shard == "1/3"), "only shard 1 writes the clean point"
    assert shard_names == {"1/3": ["x_p_exp=0.5^4", "x_p_exp=0.5^7"], "2/3": ["x_p_exp=0.5^5"],
                           "3/3": ["x_p_exp=0.5^6"]}
    calls.clear()
    merged = run_sweep(path, base, shared, "--grid", GRID, "--seeds", "2")
    assert calls == [], "the merge computes nothing that a shard wrote"
    assert merged["points"] == whole["points"]
    assert (shared / "sweep.csv").read_text() == (tmp_path / "whole" / "sweep.csv").read_text()


# the stub's perplexities per point, one per seed in order: the ratio to clean (10) of "narrow"
# is 1 under every seed (interval 0), of "slow" 1.0, 1.2, 1.1, 1.1 (full 95% widths 2.5, 0.50,
# 0.26: below 0.3 at 4 seeds), of "wide" 1 and 2 in turn (never below 0.3); "nonfinite" overflows
STUB_PERPLEXITIES = {"clean": [10.0], "x_p_exp=0.5^4": [10.0] * 8, "x_p_exp=0.5^5": [10.0, 12.0, 11.0, 11.0, 11.0],
                     "x_p_exp=0.5^6": [10.0, 20.0] * 4, "x_p_exp=0.5^7": [math.inf, 10.0, 10.0]}


def stub_evaluations(monkeypatch) -> list[str]:
    """Replace the evaluation by ``STUB_PERPLEXITIES``, the k-th call for a point giving its k-th
    value; returns the conditions called, in order."""
    calls = []

    def stub(model, windows, batch_size, condition, **kwargs):
        value = STUB_PERPLEXITIES[condition][calls.count(condition)]
        calls.append(condition)
        return PerplexityRow(condition, len(windows), 0, math.log(value), value)

    monkeypatch.setattr(runner, "perplexity", stub)
    return calls


def test_ci_width_stops_points_whose_interval_is_narrow_and_keeps_going_on_wide_ones(tiny, tmp_path, monkeypatch,
                                                                                       capsys):
    path, base = tiny
    calls = stub_evaluations(monkeypatch)
    prepared = []
    prepare_points = runner.prepare_points
    monkeypatch.setattr(runner, "prepare_points", lambda model, names, points: prepared.append(
        (len(calls), [point.name for point in points])) or prepare_points(model, names, points))
    payload = run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", "6", "--ci-width", "0.3")
    narrow, slow, wide, nonfinite = (f"x_p_exp=0.5^{k}" for k in range(4, 8))
    assert prepared == [(0, ["clean", narrow, slow, wide, nonfinite])], "prepared once, for every point, before any"
    # rounds: two seeds each, then one more a round to the points still too wide
    assert calls == (["clean"] + [narrow] * 2 + [slow] * 2 + [wide] * 2 + [nonfinite] * 2
                     + [slow, wide] * 2 + [wide] * 2)
    rows = {row["name"]: row for row in payload["points"]}
    assert {name: (row["seeds"], row["stopped_by"]) for name, row in rows.items()} == {
        "clean": (1, "clean"), narrow: (2, "ci-width"), slow: (4, "ci-width"), wide: (6, "seeds"),
        nonfinite: (2, "nonfinite")}
    assert rows[slow]["perplexity_ratio_ci95"] == pytest.approx(3.182446305284263 * np.std([1, 1.2, 1.1, 1.1], ddof=1) / 2)
    assert 2 * rows[wide]["perplexity_ratio_ci95"] >= 0.3 and rows[nonfinite]["perplexity_ratio_ci95"] is None
    with open(tmp_path / "out" / "sweep.csv") as file:
        table = {row["name"]: row for row in csv.DictReader(file)}
    assert {name: (row["seeds"], row["stopped_by"]) for name, row in table.items()} == {
        name: (str(row["seeds"]), row["stopped_by"]) for name, row in rows.items()}
    printed = capsys.readouterr().out
    assert "stopped by" in printed and f"{nonfinite}  2" in printed

    calls.clear()
    rerun = run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", "6", "--ci-width", "0.3")
    assert calls == [] and rerun["points"] == payload["points"], "a rerun applies the same rule to the stored seeds"


def test_ci_width_on_the_tiny_model_stops_a_point_that_flips_nothing_at_two_seeds(tiny, tmp_path, monkeypatch):
    path, base = tiny
    calls = count_evaluations(monkeypatch)
    # 0.5^24 of the ~6e4 flippable values per forward: almost surely no flip, the same
    # perplexity under every seed; 0.5^4 exponent flips in inputs move it under each seed
    payload = run_sweep(path, base, tmp_path / "out", "--grid", "x_p_exp+w_p_frac=0.5^4,0.5^24", "--seeds", "3",
                        "--ci-width", "1e-6")
    rows = {row["name"]: row for row in payload["points"]}
    assert (rows["x_p_exp+w_p_frac=0.5^24"]["seeds"], rows["x_p_exp+w_p_frac=0.5^24"]["stopped_by"]) == (2, "ci-width")
    assert (rows["x_p_exp+w_p_frac=0.5^4"]["seeds"], rows["x_p_exp+w_p_frac=0.5^4"]["stopped_by"]) == (3, "seeds")
    assert sorted(calls) == sorted(["clean"] + ["x_p_exp+w_p_frac=0.5^4"] * 3 + ["x_p_exp+w_p_frac=0.5^24"] * 2)
    stored = json.loads((tmp_path / "out" / "points" / "x_p_exp+w_p_frac=0.5^24.json").read_text())
    assert len(stored["seeds"]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--shard", "3/2"], "--shard 3/2: K must be in 1..N, got 3 of 2"),
    (["--shard", "0/2"], "--shard 0/2: K must be in 1..N, got 0 of 2"),
    (["--shard", "x"], "--shard 'x': expected K/N"),
    (["--ci-width", "0"], "--ci-width must be a number > 0, got 0"),
    (["--ci-width", "nan"], "--ci-width must be a number > 0, got nan"),
    (["--ci-width", "0.01", "--seeds", "1"], "--ci-width needs --seeds >= 2"),
])
def test_bad_shard_and_ci_width_give_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["sweep", "--checkpoint", str(tmp_path / "model"), "--bitflip-config", str(tmp_path / "base.toml"),
                 "--grid", "x_p_exp=0.5^3", "--output-dir", str(tmp_path / "out"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out").exists()
