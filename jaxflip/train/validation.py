"""Validation loss during training: the mean cross-entropy of fixed held-out batches, every
``validation.eval_interval`` steps and at the end (torchtitan's ``[validation]``, HF Trainer's
``eval_steps``, MaxText's ``eval_interval``).

The batches are the first ``eval_steps x global_batch`` windows of the held-out split, packed
as ``ppl`` packs them (``jaxflip.data.evaluation_windows``), the same at every
evaluation; the loss is the training step's own forward (``step.forward_loss``), flips
included. With ``eval_interval = 0`` nothing of this is built or compiled.
"""

from __future__ import annotations

import math

import jax

from jaxflip.data import evaluation_windows
from jaxflip.train.train_config import ConfigError, TrainConfig
from jaxflip.train.step import make_eval_step


class Validator:
    """``validator(state) -> {"val_loss", "val_perplexity"}`` on the held-out batches."""

    def __init__(self, config: TrainConfig, tokenizer, graphdef, shardings, batch_shard):
        t, v = config.training, config.validation
        global_batch = t.local_batch_size * jax.device_count()
        dataset = v.dataset or config.data.dataset
        windows = evaluation_windows(tokenizer, dataset=dataset, split=v.split,
                                     subset=config.data.subset or None, text_field=config.data.text_field,
                                     seq_len=t.seq_len, num_sequences=v.eval_steps * global_batch)
        batches = len(windows) // global_batch
        if batches == 0:
            raise ConfigError(f"validation.split: {dataset} ({v.split}) holds {len(windows)} sequences of "
                              f"{t.seq_len + 1} tokens, fewer than one batch of {global_batch}")
        rows = windows[:batches * global_batch].reshape(batches, global_batch, t.seq_len + 1)
        self.batches = jax.make_array_from_callback(rows.shape, batch_shard, lambda index: rows[index])
        self.tokens = rows.shape[0] * rows.shape[1] * t.seq_len
        self.evaluate = make_eval_step(graphdef, t, shardings, batch_shard)

    def __call__(self, state) -> dict:
        loss = float(jax.device_get(self.evaluate(state, self.batches)))
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": self.tokens}


def due(config: TrainConfig, step: int) -> bool:
    """Whether ``step`` ends with a validation."""
    interval = config.validation.eval_interval
    return interval > 0 and (step % interval == 0 or step == config.training.steps)


def format_validation(record: dict) -> str:
    return f"step {record['step']}  val_loss {record['val_loss']:.4f}  val_perplexity {record['val_perplexity']:,.2f}"
