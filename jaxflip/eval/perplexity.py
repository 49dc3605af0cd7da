"""``ppl``: token-weighted mean cross-entropy and perplexity on the first N sequences of a
dataset, clean and under bitflip, as the 70B tutorial's ``eval.py`` reports them.

Documents are packed into ``seq_len + 1`` token windows (``jaxflip.data.token_windows``: each
document then EOS); every window predicts its last ``seq_len`` tokens, so each sequence
weighs ``seq_len`` tokens.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxflip.data import BUILTIN_NAME, evaluation_windows
from jaxflip.eval.model_io import open_model, open_tokenizer, resolve_bitflip
from jaxflip.eval.report import format_table
from jaxflip.models.sharding import on_model_mesh, place_state

DEFAULT_SEQ_LEN = 2048
MAX_EXPONENT = math.log(sys.float_info.max)


@dataclass(frozen=True)
class PerplexityRow:
    condition: str
    sequences: int
    tokens: int
    loss: float  # mean cross-entropy per token, nats
    perplexity: float


@nnx.jit
def _summed_cross_entropy(model, windows: jax.Array, real_rows: jax.Array) -> jax.Array:
    """The summed cross-entropy of the first ``real_rows`` windows of the batch (the rest pad
    the last batch to the batch size)."""
    logits = model(windows[:, :-1]).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    row_losses = -jnp.sum(jnp.take_along_axis(log_probs, windows[:, 1:, None], axis=-1), axis=(1, 2))
    # where, not a product: a padding row's loss may be inf or NaN under flips
    return jnp.sum(jnp.where(jnp.arange(windows.shape[0]) < real_rows, row_losses, 0.0))


def padded_batches(windows: np.ndarray, batch_size: int):
    """``(batch, real_rows)`` per ``batch_size`` windows, the last batch padded with rows of
    token 0 to the full size: one shape, one compiled forward. Flips are keyed on each
    element's row-major index in the batch, so rows appended after the real ones leave the
    real rows' flips, and their losses, as they were."""
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        real_rows = len(batch)
        if real_rows < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real_rows, *batch.shape[1:]), batch.dtype)])
        yield batch, real_rows


def perplexity(model, windows: np.ndarray, batch_size: int, condition: str, *, progress_bar: bool = True
               ) -> PerplexityRow:
    """Mean cross-entropy over every predicted token of ``windows``, ``batch_size`` windows
    per forward (flips are keyed on the batch's layout, so the batch size is part of a
    bitflip result). ``progress_bar``: a bar per batch (a sweep shows one per evaluation instead).
    The forward compiles once per model, batch size and sequence length (``place_state``,
    ``padded_batches``)."""
    total = 0.0
    place_state(model)
    with on_model_mesh(model), tqdm(total=len(windows), desc=f"ppl {condition}", unit="seq",
                                    disable=not progress_bar) as progress:
        for batch, real_rows in padded_batches(windows, batch_size):
            total += float(_summed_cross_entropy(model, jax.device_put(batch), np.int32(real_rows)))
            progress.update(real_rows)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    loss = total / tokens
    # a loss past log(float max) (heavy exponent flips without zero-out) is an infinite perplexity, not an error
    return PerplexityRow(condition, windows.shape[0], tokens, loss,
                         math.inf if loss > MAX_EXPONENT else math.exp(loss))


def add_window_arguments(parser) -> None:
    """The options of ``evaluation_windows``, shared by ``ppl``, ``profile`` and ``sweep``."""
    parser.add_argument("--dataset", default=BUILTIN_NAME,
                        help="an HF hub dataset, a local .txt/.jsonl/.parquet file or folder, or %(default)s")
    parser.add_argument("--split", default="validation", help="dataset split (default: %(default)s)")
    parser.add_argument("--subset", default=None, help="HF dataset config name, e.g. sample-100BT")
    parser.add_argument("--text-field", default="text", help="the text column (default: %(default)s)")
    parser.add_argument("--num-sequences", type=int, default=64, help="use the first N sequences (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens predicted per sequence (default: the model's max_position_embeddings, at most "
                             f"{DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default: %(default)s)")


def resolve_seq_len(args, model) -> int:
    """``--seq-len``, defaulting to what the model was built for; a longer one is said (RoPE
    runs past ``max_position_embeddings``, but the model never saw such positions)."""
    positions = model.config.max_position_embeddings
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, positions)
    elif args.seq_len > positions:
        print(f"note: --seq-len {args.seq_len} is longer than the model's max_position_embeddings {positions}",
              file=sys.stderr)
    return args.seq_len


def open_windows(args, model, tokenizer) -> np.ndarray:
    """The evaluation windows of ``add_window_arguments``' options (``--seq-len`` resolved for
    ``model``); fewer than ``--num-sequences`` is said."""
    windows = evaluation_windows(tokenizer, dataset=args.dataset, split=args.split, subset=args.subset,
                                 text_field=args.text_field, seq_len=resolve_seq_len(args, model),
                                 num_sequences=args.num_sequences)
    if len(windows) < args.num_sequences:
        print(f"note: {args.dataset} holds only {len(windows)} sequences of {args.seq_len + 1} tokens")
    return windows


def add_arguments(parser) -> None:
    add_window_arguments(parser)
    parser.add_argument("--bitflip-only", action="store_true", help="skip the clean row (needs --bitflip-config)")


def check_window_arguments(args) -> None:
    """The checks of ``add_window_arguments``' options."""
    for name in ("num_sequences", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def check_arguments(args) -> None:
    check_window_arguments(args)
    if args.bitflip_only and args.bitflip_config is None:
        raise ValueError("--bitflip-only needs --bitflip-config")


def run(args) -> dict:
    model, tokenizer_dir = open_model(args.checkpoint, dtype=args.dtype)
    bitflip = resolve_bitflip(model, args)  # a rule that fits no layer fails before the clean pass
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    windows = open_windows(args, model, tokenizer)
    rows = [] if args.bitflip_only else [perplexity(model, windows, args.batch_size, "clean")]
    payload = {"command": "ppl", "checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
               "seq_len": args.seq_len, "batch_size": args.batch_size}
    if bitflip is not None:
        bitflip.apply(model)
        rows.append(perplexity(model, windows, args.batch_size, "bitflip"))
        payload["bitflip"] = bitflip.summary()
    payload["rows"] = [asdict(row) for row in rows]
    print(format_table(["condition", "sequences", "tokens", "loss (CE)", "perplexity"],
                       [[row.condition, row.sequences, row.tokens, row.loss, row.perplexity] for row in rows]))
    if len(rows) == 2:
        payload["perplexity_ratio"] = rows[1].perplexity / rows[0].perplexity
        print(f"bitflip / clean perplexity: {payload['perplexity_ratio']:.4f}x")
    return payload
