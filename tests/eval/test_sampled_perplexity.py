"""At the model level, sampled flips (``exact=False``) damage perplexity as exact ones do: over
16 seeds each, the 95% intervals of a small model's perplexity overlap, and a sampler with p
sixteen times too large falls outside the exact one's.

The model and the seeds are fixed, not fresh: two 95% intervals of one distribution fail to
overlap about 0.6% of the time, and a fixed draw makes the check a deterministic property of
the code (the flips are a pure function of the model, the settings and the seeds).
"""

import numpy as np
import pytest
from tiny_models import tiny_text_model

from jaxflip.bitflip import BitflipConfig
from jaxflip.data import evaluation_windows, load_tokenizer
from jaxflip.eval.perplexity import perplexity

SEEDS = range(100, 116)
HALVES = 10
BATCH = 4


def interval(values: list[float]) -> tuple[float, float]:
    """The 95% normal interval of the mean."""
    half_width = 1.96 * np.std(values, ddof=1) / np.sqrt(len(values))
    return np.mean(values) - half_width, np.mean(values) + half_width


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


@pytest.mark.slow  # 48 evaluations and three compilations: about a minute on two cores
def test_sampled_and_exact_perplexity_intervals_overlap_and_p_times_16_does_not():
    windows = evaluation_windows(load_tokenizer("builtin"), dataset="builtin:moby-dick", split="validation",
                                 subset=None, text_field="text", seq_len=32, num_sequences=32)
    _, model = tiny_text_model(np.random.default_rng(3))

    def perplexities(halves: int, exact: bool) -> list[float]:
        values = []
        for seed in SEEDS:
            p = 0.5**halves
            BitflipConfig(x_p_exp=p, x_p_frac=p, w_p_exp=p, w_p_frac=p, x_zero_out_t=50.0, w_zero_out_t=1.0,
                          base_seed=seed, exact=exact).apply(model)
            values.append(perplexity(model, windows, BATCH, "bitflip", progress_bar=False).perplexity)
        return values

    exact = interval(perplexities(HALVES, exact=True))
    assert overlap(exact, interval(perplexities(HALVES, exact=False)))
    assert not overlap(exact, interval(perplexities(HALVES - 4, exact=False)))
