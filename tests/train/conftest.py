"""Tiny training jobs for the train tests."""

import pytest

from jaxflip.train.train_config import from_dict

# a rule for one Linear only: flips that matter, without compiling Philox for every layer
ONE_LAYER_FLIPS = {r"model\.layers\.0\.mlp\.down_proj": dict(
    x_p_exp=0.5**10, x_p_frac=0.5**6, x_zero_out_t=30.0, w_p_exp=0.5**10, w_p_frac=0.5**6, w_zero_out_t=1.25)}


@pytest.fixture
def tiny_job(tmp_path):
    def make(**sections) -> "TrainConfig":  # noqa: F821
        raw = {
            "job": {"output_dir": str(tmp_path / "run"), "seed": 3},
            "model": {"flavor": "aixsim-debug", "vocab_size": 4096},
            "training": {"seq_len": 32, "local_batch_size": 1, "steps": 6, "lr": 3e-3, "warmup_steps": 2,
                         "log_freq": 1, "save_freq": 2, "gradient_accumulation_steps": 2},
            "parallelism": {"fsdp_degree": -1},
            "bitflip": {"rules": ONE_LAYER_FLIPS, "base_seed": 5},
            "data": {"dataset": "builtin:moby-dick", "tokenizer": "builtin", "prefetch": 2},
            "checkpoint": {"async_save": False},
            "metrics": {"tensorboard": False, "plot": False, "progress_bar": False},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return from_dict(raw)

    return make
