"""``profile``: its percentiles are numpy's on the tensors the Linear layers see."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_models import save_checkpoint, tiny_text_model

from jaxflip.bitflip import BitFlipLinear, named_linears
from jaxflip.data import load_tokenizer
from jaxflip.eval.__main__ import main
from jaxflip.data import evaluation_windows
from jaxflip.eval.profile import PERCENTILES, abs_histogram, percentiles

SEQ_LEN, SEQUENCES, BATCH = 16, 3, 2


def numpy_summary(values: np.ndarray) -> dict[str, float]:
    """numpy's percentiles of |values| truncated to bfloat16 (the profile's resolution) and
    the exact max."""
    magnitudes = np.abs(np.asarray(values, np.float32))
    truncated = (magnitudes.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return {name: float(np.percentile(truncated, q, method="inverted_cdf")) for name, q in PERCENTILES.items()} | {
        "max": float(magnitudes.max())}


def captured_linear_inputs(model, tokens: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every Linear's inputs over the profile's batches, recorded by running eagerly."""
    captured = {name: [] for name in named_linears(model)}
    names = {id(linear): name for name, linear in named_linears(model).items()}
    original = BitFlipLinear.flip_input  # every input passes here, a shared one too

    def recording(self, x):
        captured[names[id(self)]].append(np.asarray(x))
        return original(self, x)

    BitFlipLinear.flip_input = recording
    try:
        for start in range(0, len(tokens), BATCH):
            model(jnp.asarray(tokens[start:start + BATCH, :-1]))
    finally:
        BitFlipLinear.flip_input = original
    return captured


def test_histogram_percentiles_equal_numpy_on_bfloat16_values():
    rng = np.random.default_rng()
    values = (rng.standard_normal(50_001) * np.exp(rng.uniform(-8, 8, 50_001))).astype(jnp.bfloat16)
    histogram, maximum = abs_histogram(jnp.asarray(values))
    expected = numpy_summary(values)
    assert percentiles(np.asarray(histogram, np.int64)) == {k: v for k, v in expected.items() if k != "max"}
    assert float(maximum) == expected["max"]


def test_profile_rows_equal_numpy_on_the_captured_tensors(tmp_path):
    """Weights exactly. Inputs are captured by an eager run, whose float32 rounding may differ
    from the compiled profile run by an ulp; an order statistic moves by no more than its
    inputs, so each percentile may land one bfloat16 step away."""
    hf_model, model = tiny_text_model(np.random.default_rng())
    path = save_checkpoint(model, tmp_path / "model")
    output = tmp_path / "profile.json"
    assert main(["profile", "--checkpoint", path, "--seq-len", str(SEQ_LEN), "--num-sequences", str(SEQUENCES),
                 "--batch-size", str(BATCH), "--output", str(output)]) == 0
    result = json.loads(output.read_text())

    tokens = evaluation_windows(load_tokenizer("builtin"), dataset="builtin:moby-dick", split="validation",
                                subset=None, text_field="text", seq_len=SEQ_LEN, num_sequences=SEQUENCES)
    inputs = captured_linear_inputs(model, tokens)
    linears = named_linears(model)
    eligible = [name for name in linears if name != "lm_head"]
    # in HF's module order, which is the order the forward runs them
    assert list(result["layers"]) == [name for name, module in hf_model.named_modules()
                                      if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    for name in eligible:
        x = np.concatenate([batch.reshape(-1) for batch in inputs[name]])
        x_row, w_row = ({k: v for k, v in result["layers"][name][kind].items() if k != "suggested_zero_out_t"}
                        for kind in ("x", "w"))
        assert x_row == pytest.approx(numpy_summary(x), rel=2**-7), name
        assert w_row == numpy_summary(np.asarray(linears[name].weight[...])), name
    all_weights = np.concatenate([np.asarray(linears[name].weight[...]).reshape(-1) for name in eligible])
    assert result["overall"]["w"] == numpy_summary(all_weights)
    for kind, key in (("x", "x_zero_out_t"), ("w", "w_zero_out_t")):
        threshold, maximum = result["suggested_zero_out_t"][key], result["overall"][kind]["max"]
        assert threshold >= 2 * maximum and np.log2(threshold).is_integer()
    assert Path(result["histogram_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_forward_compiles_once_and_padding_rows_count_nowhere(checkpoint):
    """Three windows in batches of 2 (the last padded) give the histograms of batches of 1."""
    from jaxflip.compile_count import CompileCount
    from jaxflip.eval.model_io import open_model
    from jaxflip.eval.profile import profile_model

    model, _ = open_model(checkpoint[0])
    tokens = evaluation_windows(load_tokenizer("builtin"), dataset="builtin:moby-dick", split="validation",
                                subset=None, text_field="text", seq_len=SEQ_LEN, num_sequences=3)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with CompileCount() as compiles:
        padded = profile_model(model, tokens, layers, 2)
    assert compiles.of("_forward") == 1, compiles
    one_by_one = profile_model(model, tokens, layers, 1)
    for name in layers:
        assert np.array_equal(padded["x"][name].histogram, one_by_one["x"][name].histogram), name
        assert padded["x"][name].maximum == one_by_one["x"][name].maximum, name
