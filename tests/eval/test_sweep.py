"""``sweep`` against separate ``ppl`` runs, its traces per seed, its resume after an interruption,
the per-layer map, the grid syntax and the one-line errors. The model is a fresh random tiny
Llama on the 8 host CPU devices (tests/conftest.py), so the sweep runs sharded as on a GPU host."""

import csv
import json
import re

import numpy as np
import pytest
from tiny_models import save_checkpoint, tiny_text_model

from jaxflip.bitflip import BitflipConfig, find_nearest_prob_n_halves
from jaxflip.compile_count import CompileCount
from jaxflip.eval.__main__ import main
from jaxflip.eval.sweep import points as sweep_points
from jaxflip.eval.sweep import report as sweep_report
from jaxflip.eval.sweep import runner

SEQ_LEN, SEQUENCES, BATCH = 32, 4, 2
BASE_SEED = 7
# layer 1's MLP only: three flipped Linears compile in seconds on a CPU
BASE_TOML = f"""
[bitflip]
x_p_exp = 0.0009765625
x_zero_out_t = 50.0
w_p_frac = 0.0009765625
w_zero_out_t = 1.0
base_seed = {BASE_SEED}
skip_patterns = ["layers.0.", "self_attn"]
"""
GRID = "x_p_exp=0.5^4:0.5^6"
HALVES = (4, 5, 6)
SEEDS = 4


def window_arguments():
    return ["--seq-len", str(SEQ_LEN), "--num-sequences", str(SEQUENCES), "--batch-size", str(BATCH)]


def run_sweep(path, base, output_dir, *extra) -> dict:
    output = output_dir.parent / f"{output_dir.name}.json"
    assert main(["sweep", "--checkpoint", path, "--bitflip-config", str(base), *window_arguments(),
                 "--output-dir", str(output_dir), "--output", str(output), *extra]) == 0
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """``(folder, checkpoint, base config, payload)`` of a 3-point x 4-seed sweep of a random tiny model."""
    folder = tmp_path_factory.mktemp("sweep")
    _, model = tiny_text_model(np.random.default_rng())
    path = save_checkpoint(model, folder / "model")
    base = folder / "base.toml"
    base.write_text(BASE_TOML)
    return folder, path, base, run_sweep(path, base, folder / "out", "--grid", GRID, "--seeds", str(SEEDS))


def test_each_seed_of_each_point_equals_a_separate_ppl_run(swept, tmp_path):
    _, path, _, payload = swept
    points = {row["name"]: row for row in payload["points"]}
    assert list(points) == ["clean"] + [f"x_p_exp=0.5^{k}" for k in HALVES]
    for halves in HALVES:
        for seed in range(BASE_SEED, BASE_SEED + SEEDS):
            config = tmp_path / f"{halves}_{seed}.toml"
            config.write_text(BASE_TOML.replace("x_p_exp = 0.0009765625", f"x_p_exp = {0.5**halves}")
                              .replace(f"base_seed = {BASE_SEED}", f"base_seed = {seed}"))
            output = tmp_path / "ppl.json"
            assert main(["ppl", "--checkpoint", path, "--bitflip-config", str(config), "--bitflip-only",
                         *window_arguments(), "--output", str(output)]) == 0
            (row,) = json.loads(output.read_text())["rows"]
            per_seed = {r["seed"]: r for r in points[f"x_p_exp=0.5^{halves}"]["per_seed"]}
            assert per_seed[seed]["loss"] == row["loss"] and per_seed[seed]["perplexity"] == row["perplexity"]
    losses = [r["loss"] for r in points["x_p_exp=0.5^4"]["per_seed"]]
    assert len(set(losses)) == SEEDS, "each seed should flip other bits"


def test_table_holds_each_points_mean_and_interval_and_the_plot_is_written(swept):
    folder, _, _, payload = swept
    with open(folder / "out" / "sweep.csv") as file:
        table = {row["name"]: row for row in csv.DictReader(file)}
    assert list(table) == [row["name"] for row in payload["points"]]
    for point in payload["points"][1:]:
        losses = np.array([r["loss"] for r in point["per_seed"]])
        half_width = 3.182446305284263 * losses.std(ddof=1) / np.sqrt(SEEDS)  # t(0.975, 3 degrees of freedom)
        assert float(table[point["name"]]["loss_mean"]) == pytest.approx(losses.mean(), rel=1e-12)
        assert float(table[point["name"]]["loss_ci95"]) == pytest.approx(half_width, rel=1e-9)
        assert point["perplexity_ratio"] == pytest.approx(point["perplexity_mean"] / payload["points"][0]["perplexity_mean"])
    assert json.loads((folder / "out" / "sweep.json").read_text())["points"] == payload["points"]
    assert (folder / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_sweep_compiles_the_same_programs_for_2_and_4_points(swept, tmp_path, per_layer):
    """Flip settings and seeds are run-time state: a sweep of 4 points compiles what one of 2
    points does, one forward (the clean point shares it), whatever the points and seeds. Each
    sweep uses a sequence length no other test compiles, so both start cold."""
    _, path, base, _ = swept
    counts = []
    for n_points, seq_len in ((2, 28), (4, 12)) if per_layer else ((2, 24), (4, 20)):
        points = (["--per-layer", "linear", "--groups", ",".join(["x_p_exp", "w_p_frac"][:n_points // 2])]
                  if per_layer else ["--grid", f"x_p_exp=0.5^8:0.5^{7 + n_points}"])
        with CompileCount() as compiles:
            output = tmp_path / f"out{n_points}"
            assert main(["sweep", "--checkpoint", path, "--bitflip-config", str(base), "--seq-len", str(seq_len),
                         "--num-sequences", str(SEQUENCES), "--batch-size", str(BATCH), "--output-dir", str(output),
                         "--seeds", "2", *points]) == 0
        rows = json.loads((output / "sweep.json").read_text())["points"]
        assert len(rows) == n_points * (3 if per_layer else 1) // (2 if per_layer else 1) + 1
        counts.append(compiles)
    # the forward once per sweep; the rest (small setup programs) do not grow with the points
    assert [c.of("_summed_cross_entropy") for c in counts] == [1, 1], counts
    assert counts[1].total <= counts[0].total, counts


def test_an_interrupted_sweep_resumes_without_recomputing_finished_points(swept, tmp_path, monkeypatch):
    _, path, base, full = swept
    calls = []

    def interrupted(model, windows, batch_size, condition, **kwargs):
        if condition == "x_p_exp=0.5^6":
            raise KeyboardInterrupt  # as a Ctrl-C during the third point
        calls.append(condition)
        return perplexity(model, windows, batch_size, condition, **kwargs)

    perplexity = runner.perplexity
    monkeypatch.setattr(runner, "perplexity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", "2")
    points = tmp_path / "out" / "points"
    finished = {file.name: file.read_bytes() for file in points.iterdir()}
    assert sorted(finished) == ["clean.json", "x_p_exp=0.5^4.json", "x_p_exp=0.5^5.json"]

    calls.clear()
    monkeypatch.setattr(runner, "perplexity", lambda *args, **kwargs: calls.append(args[3]) or perplexity(*args, **kwargs))
    resumed = run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", "2")
    assert calls == ["x_p_exp=0.5^6"] * 2
    assert all((points / name).read_bytes() == content for name, content in finished.items())
    for point, reference in zip(resumed["points"], full["points"]):
        assert point["per_seed"] == reference["per_seed"][:2]


def test_per_layer_map_flips_one_target_and_group_as_a_ppl_run_of_those_rules(swept, tmp_path):
    _, path, base, _ = swept
    payload = run_sweep(path, base, tmp_path / "map", "--per-layer", "type", "--groups", "x_p_exp", "--seeds", "1")
    cells = {row["name"]: row for row in payload["points"][1:]}
    assert list(cells) == [f"mlp.{p}_proj x_p_exp" for p in ("down", "gate", "up")]
    section = tmp_path / "cell.toml"  # the up_proj cell: x's exponent bits of layer 1's up_proj alone
    section.write_text(f"[bitflip]\nbase_seed = {BASE_SEED}\n" + r"""
[bitflip.rules.'model\.layers\.1\.mlp\.up_proj']
x_p_exp = 0.0009765625
x_zero_out_t = 50.0
""")
    output = tmp_path / "ppl.json"
    assert main(["ppl", "--checkpoint", path, "--bitflip-config", str(section), "--bitflip-only",
                 *window_arguments(), "--output", str(output)]) == 0
    assert json.loads(output.read_text())["bitflip"]["flipped_layers"] == ["model.layers.1.mlp.up_proj"]
    # the same flips; the sweep's program is armed for every cell, ppl's for this one: float rounding may differ
    assert cells["mlp.up_proj x_p_exp"]["loss_mean"] == pytest.approx(json.loads(output.read_text())["rows"][0]["loss"],
                                                                      rel=1e-6)
    assert (tmp_path / "map" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_ranges_step_by_halves_in_either_direction():
    assert sweep_points.parse_grid("x_p_frac=0.5^6:0.5^16").values == tuple(0.5**k for k in range(6, 17))
    assert sweep_points.parse_grid("w_p_exp+w_p_frac=0.5^10:0.5^4:3").values == (0.5**10, 0.5**7, 0.5**4)
    axis = sweep_points.parse_grid("x_zero_out_t=1,30,none")
    assert axis.fields == ("x_zero_out_t",) and axis.values == (1.0, 30.0, None)


def test_a_rules_base_gets_the_grid_value_in_every_rule_that_flips():
    rng = np.random.default_rng()
    value = 0.5 ** int(rng.integers(2, 20))
    base = BitflipConfig(rules={r"model\.layers\.0\..*": None, r".*up_proj": {"w_p_exp": 0.5**9},
                                "default": {"x_p_exp": 0.5**12, "x_zero_out_t": 3.0}})
    names = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "down")]
    table = sweep_points.with_settings(base, {"x_p_frac": value}).match(names)
    halves = {row.layer: row.x_flip.frac_halves for row in table}
    assert halves == {"model.layers.0.mlp.up_proj": None, "model.layers.0.mlp.down_proj": None,
                      "model.layers.1.mlp.up_proj": find_nearest_prob_n_halves(value),
                      "model.layers.1.mlp.down_proj": find_nearest_prob_n_halves(value)}
    assert [row.w_flip.exp_halves for row in table][2] == 9, "the rule's other settings stay"


@pytest.mark.parametrize("extra, message", [
    (["--grid", "x_p_foo=0.5^3"], "unknown flip field 'x_p_foo'"),
    (["--grid", "x_p_exp=2"], "--grid x_p_exp=2: bitflip.x_p_exp must be a probability in (0, 1)"),
    (["--grid", "x_zero_out_t=1:8"], "a 0.5^A:0.5^B range is for probabilities"),
    (["--grid", "x_p_exp=0.5^3", "--per-layer", "type"], "either --grid (one or more) or --per-layer"),
    (["--per-layer", "type", "--groups", "x_exp"], "unknown bit group 'x_exp'"),
    (["--grid", "x_p_exp=0.5^3", "--seeds", "0"], "--seeds must be >= 1, got 0"),
])
def test_bad_arguments_give_one_line_errors(swept, tmp_path, capsys, extra, message):
    _, path, base, _ = swept
    assert main(["sweep", "--checkpoint", path, "--bitflip-config", str(base), "--output-dir",
                 str(tmp_path / "out"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out").exists()


def test_reference_seeds_are_refused_since_every_seed_would_flip_alike(swept, tmp_path, capsys):
    _, path, _, _ = swept
    reference = tmp_path / "reference.toml"
    reference.write_text(re.sub(r"base_seed = \d+", 'seed_mode = "reference"', BASE_TOML))
    assert main(["sweep", "--checkpoint", path, "--bitflip-config", str(reference), "--grid", "x_p_exp=0.5^3",
                 "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "seed_mode 'reference' gives every seed the same flips" in error


def test_each_points_sample_is_the_generate_command_under_its_first_seed(swept, tmp_path, capsys):
    _, path, base, _ = swept
    prompt = "the quick"
    payload = run_sweep(path, base, tmp_path / "out", "--grid", "x_p_exp=0.5^4", "--seeds", "1",
                        "--sample-prompt", prompt, "--sample-tokens", "6")
    printed = capsys.readouterr().out.splitlines()
    config = tmp_path / "point.toml"
    config.write_text(BASE_TOML.replace("x_p_exp = 0.0009765625", f"x_p_exp = {0.5**4}"))
    for row, flips in zip(payload["points"], ([], ["--bitflip-config", str(config)])):
        output = tmp_path / "generate.json"
        assert main(["generate", prompt, "--checkpoint", path, "--max-new-tokens", "6", *flips,
                     "--output", str(output)]) == 0
        assert row["samples"] == {prompt: json.loads(output.read_text())["text"]}, row["name"]
        assert f"{row['name']}: {json.dumps(prompt + row['samples'][prompt], ensure_ascii=False)}" in printed
    # an exponent flip in 1 of 16 inputs of layer 1's MLP changes a random model's greedy tokens
    assert payload["points"][0]["samples"] != payload["points"][1]["samples"]


def test_a_rerun_says_how_many_points_and_evaluations_it_reused(swept, tmp_path, capsys):
    """A fresh sweep says nothing of reuse; a rerun with one more seed names the points it
    found and the evaluations it did not run again."""
    _, path, base, _ = swept
    seeds = int(np.random.default_rng().integers(1, 3))
    first = run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", str(seeds))
    assert "resumed:" not in capsys.readouterr().out
    run_sweep(path, base, tmp_path / "out", "--grid", GRID, "--seeds", str(seeds + 1))
    points = len(first["points"])
    evaluations = sum(row["seeds"] for row in first["points"])
    assert (f"resumed: {points} of {points} points found in {tmp_path / 'out' / 'points'}, {evaluations} evaluations "
            f"reused") in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("spread", [1.01, 1000.0])
def test_the_perplexity_axis_is_labelled_with_plain_numbers(spread):
    """Perplexities within 1% (a linear axis) or over three decades (a log axis): every y tick
    label reads as a plain number, never as matplotlib's 7.364x10^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng()
    clean = float(rng.uniform(50, 5000))
    values = clean * spread ** rng.uniform(0, 1, 8)
    figure, axis = plt.subplots()
    axis.plot(np.arange(len(values)), values)
    sweep_report.perplexity_axis(axis, [clean, *values])
    figure.canvas.draw()
    labels = [label.get_text() for minor in (False, True) for label in axis.get_yticklabels(minor=minor)
              if label.get_text()]
    plt.close(figure)
    assert labels and all(re.fullmatch(r"[0-9,]+(\.[0-9]+)?", label) for label in labels), labels
