"""``profile``: the range of |x| at every bitflip-eligible Linear input and of |W|, per layer
and overall, to place zero-out thresholds above the legitimate values (the 70B tutorial's
``eval.py --profile``).

Values are counted in a histogram with one bin per bfloat16 magnitude (the top 16 bits of
the float32 pattern: 8 exponent and 7 fraction bits), so memory stays fixed however many
tokens pass. Percentiles are numpy's ``inverted_cdf`` percentiles of the values truncated to
bfloat16: exact for bfloat16 models, within 2**-7 relative below the exact value for
float32 ones. Maxima are exact. The model runs clean; ``--bitflip-config`` only selects the
layers (those it flips; without it, every Linear but the LM head).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflip.bitflip import LM_HEAD, BitFlipLinear, named_linears, replace_module
from jaxflip.eval.model_io import BitflipSetup, open_model, open_tokenizer, resolve_bitflip
from jaxflip.eval.perplexity import add_window_arguments, check_window_arguments, open_windows, padded_batches
from jaxflip.eval.report import format_table
from jaxflip.models.sharding import mesh_context, model_mesh, place_state

BINS = 1 << 15  # |value| as bfloat16 bits: sign dropped
PERCENTILES = {"p50": 50.0, "p99": 99.0, "p99.9": 99.9, "p99.99": 99.99}
THRESHOLD_MARGIN = 2.0  # suggested zero-out threshold: a power of two at least this far above the max


class AbsStats(nnx.Variable):
    """Histogram (int32 per forward; the host sums them in int64) and max of |values|."""


class RealRows(nnx.Variable):
    """An int32 scalar: how many leading rows of the current batch are real (the rest pad the
    last batch to the batch size, see ``jaxflip.eval.perplexity.padded_batches``)."""


@jax.jit
def abs_histogram(values: jax.Array, real_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Histogram and max of |values|, counting only the first ``real_rows`` rows (default: all)."""
    magnitudes = jnp.abs(values.astype(jnp.float32))
    weights = None
    if real_rows is not None:  # a padding row weighs 0 in the histogram and counts as 0 for the max
        rows = jnp.arange(values.shape[0]).reshape((-1,) + (1,) * (values.ndim - 1)) < real_rows
        magnitudes = jnp.where(rows, magnitudes, 0.0)
        weights = jnp.broadcast_to(rows, values.shape).reshape(-1).astype(jnp.int32)
    magnitudes = magnitudes.reshape(-1)
    bins = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(magnitudes, jnp.uint32), jnp.uint32(16))
    return jnp.bincount(bins.astype(jnp.int32), weights, length=BINS).astype(jnp.int32), jnp.max(magnitudes)


def bin_values() -> np.ndarray:
    """The float32 value at the bottom of each bin."""
    return (np.arange(BINS, dtype=np.uint32) << 16).view(np.float32)


def percentiles(histogram: np.ndarray) -> dict[str, float]:
    """numpy's ``inverted_cdf`` percentiles: the smallest value whose cumulative count reaches
    ``q / 100`` of all."""
    cumulative = np.cumsum(histogram)
    values = bin_values()
    return {name: float(values[np.searchsorted(cumulative, q / 100 * cumulative[-1])])
            for name, q in PERCENTILES.items()}


def suggested_threshold(maximum: float) -> float:
    return float(2.0 ** math.ceil(math.log2(THRESHOLD_MARGIN * maximum))) if maximum > 0 else 1.0


class ProfiledLinear(nnx.Module):
    """A Linear that also counts |x| of every input it sees (flips off: the clean range)."""

    def __init__(self, linear: BitFlipLinear):
        self.linear = linear
        self.histogram = AbsStats(jnp.zeros(BINS, jnp.int32))
        self.maximum = AbsStats(jnp.zeros((), jnp.float32))
        self.real_rows = RealRows(np.int32(0))  # set before each forward

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(self.flip_input(x))

    # what the model's shared-input flips (jaxflip.bitflip.linear.flip_shared_input) call
    @property
    def x_armed(self):
        return self.linear.x_armed

    @property
    def x_seeds_shared(self) -> bool:
        return self.linear.x_seeds_shared

    def flip_input(self, x: jax.Array) -> jax.Array:
        histogram, maximum = abs_histogram(x, self.real_rows[...])
        self.histogram[...] += histogram
        self.maximum[...] = jnp.maximum(self.maximum[...], maximum)
        return self.linear.flip_input(x)

    def project(self, x: jax.Array) -> jax.Array:
        return self.linear.project(x)


class Accumulator:
    """Host-side int64 histogram and max of one tensor kind of one layer."""

    def __init__(self):
        self.histogram = np.zeros(BINS, np.int64)
        self.maximum = 0.0

    def add(self, histogram, maximum) -> None:
        self.histogram += np.asarray(histogram, np.int64)
        self.maximum = max(self.maximum, float(maximum))

    def summary(self) -> dict[str, float]:
        return percentiles(self.histogram) | {"max": self.maximum}


@nnx.jit
def _forward(model, inputs):
    model(inputs)


# a Llama decoder layer's Linears in the order its forward runs them (HF's module order)
FORWARD_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def in_forward_order(names: list[str]) -> list[str]:
    """Layer names by decoder layer, then as the forward runs them, the LM head last (NNX
    lists a layer's modules alphabetically: down_proj before q_proj)."""
    def key(name: str):
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[-1] in FORWARD_ORDER:
            return 0, int(parts[2]), FORWARD_ORDER.index(parts[-1])
        return 1, 0, 0
    return sorted(names, key=key)


def eligible_layers(model, bitflip: BitflipSetup | None) -> list[str]:
    """The layers a bitflip config flips (without one, every Linear but the LM head: the
    layers NewComputeBench flips), in forward order."""
    if bitflip is None:
        return in_forward_order([name for name in named_linears(model) if name != LM_HEAD])
    return in_forward_order([row.layer for row in bitflip.table if row.flipped])


def profile_model(model, windows: np.ndarray, layers: list[str], batch_size: int) -> dict[str, dict[str, Accumulator]]:
    """``{"x": {layer: Accumulator}, "w": {...}}`` over every window; the model is unchanged
    after (the profiling wrappers are taken out again)."""
    linears = named_linears(model)
    stats = {"x": {name: Accumulator() for name in layers}, "w": {name: Accumulator() for name in layers}}
    for name in layers:
        stats["w"][name].add(*abs_histogram(linears[name].effective_weight()))
    wrappers = {name: ProfiledLinear(linears[name]) for name in layers}
    for name, wrapper in wrappers.items():
        replace_module(model, name, wrapper)
    mesh = model_mesh(model)
    try:
        for batch, real_rows in padded_batches(windows, batch_size):
            for wrapper in wrappers.values():
                wrapper.real_rows.set_value(np.int32(real_rows))
            place_state(model)  # the forward compiles once: its counters and row counts always on the device
            with mesh_context(mesh):
                _forward(model, jax.device_put(batch[:, :-1]))
            for name, wrapper in wrappers.items():
                stats["x"][name].add(wrapper.histogram[...], wrapper.maximum[...])
                wrapper.histogram.set_value(np.zeros(BINS, np.int32))
    finally:
        for name in layers:
            replace_module(model, name, linears[name])
    return stats


def overall(accumulators: dict[str, Accumulator]) -> Accumulator:
    total = Accumulator()
    for accumulator in accumulators.values():
        total.add(accumulator.histogram, accumulator.maximum)
    return total


def plot_histograms(totals: dict[str, Accumulator], thresholds: dict[str, float], path: str) -> None:
    """|x| and |W| counts per power-of-two magnitude, with p99.99, max and the suggestion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    titles = {"x": "|x| at Linear inputs", "w": "|W| of Linear weights"}
    for axis, (kind, total) in zip(axes, totals.items()):
        per_exponent = total.histogram.reshape(-1, 128).sum(axis=1)  # 128 fraction patterns per exponent
        exponents = np.nonzero(per_exponent)[0]
        edges = 2.0 ** (exponents.astype(np.float64) - 127)
        axis.bar(edges, per_exponent[exponents], width=edges, align="edge", color="tab:blue")
        summary = total.summary()
        for value, label, style in ((summary["p99.99"], "p99.99", ":"), (summary["max"], "max", "--"),
                                    (thresholds[kind], "suggested zero_out_t", "-")):
            axis.axvline(value, color="tab:red", linestyle=style, label=f"{label} {value:.4g}")
        axis.set(xscale="log", yscale="log", title=titles[kind], xlabel="magnitude", ylabel="count")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser) -> None:
    add_window_arguments(parser)
    parser.add_argument("--histogram", default=None, help="write the histogram PNG here (default: next to --output, "
                                                          "else profile_histogram.png)")


def check_arguments(args) -> None:
    check_window_arguments(args)


def run(args) -> dict:
    model, tokenizer_dir = open_model(args.checkpoint, dtype=args.dtype)
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    windows = open_windows(args, model, tokenizer)
    layers = eligible_layers(model, resolve_bitflip(model, args))
    stats = profile_model(model, windows, layers, args.batch_size)
    totals = {kind: overall(per_layer) for kind, per_layer in stats.items()}
    thresholds = {kind: suggested_threshold(total.maximum) for kind, total in totals.items()}

    columns = ["p50", *list(PERCENTILES)[1:], "max"]
    rows = [[name, kind, *(stats[kind][name].summary()[c] for c in columns)] for name in layers for kind in ("x", "w")]
    rows += [["overall", kind, *(totals[kind].summary()[c] for c in columns)] for kind in ("x", "w")]
    print(format_table(["layer", "tensor", *columns], rows))
    print(f"{len(windows)} sequences, {windows.shape[0] * (windows.shape[1] - 1)} tokens, {len(layers)} layers; "
          f"suggested zero-out thresholds: x_zero_out_t = {thresholds['x']:g}, w_zero_out_t = {thresholds['w']:g}")
    histogram_path = args.histogram or (str(args.output).removesuffix(".json") + "_histogram.png" if args.output
                                        else "profile_histogram.png")
    plot_histograms(totals, thresholds, histogram_path)
    print(f"histogram: {histogram_path}")
    return {
        "command": "profile", "checkpoint": args.checkpoint, "dataset": args.dataset, "sequences": len(windows),
        "seq_len": args.seq_len, "histogram_png": histogram_path,
        "overall": {kind: total.summary() for kind, total in totals.items()},
        "suggested_zero_out_t": {"x_zero_out_t": thresholds["x"], "w_zero_out_t": thresholds["w"]},
        "layers": {name: {kind: stats[kind][name].summary() | {"suggested_zero_out_t": suggested_threshold(
            stats[kind][name].maximum)} for kind in ("x", "w")} for name in layers},
    }
