"""``JaxLM``: lm-eval's model interface on the Flax model, computed the way lm-eval's HFLM
computes it.

Tokenization, truncation, rolling windows, request order, batch composition and right
padding all follow HFLM (lm-eval 0.4), through lm-eval's own helpers: the same checkpoint
gives the same numbers through both, and under bitflip the same flips too, since flips are
keyed on the position of each element in the batch tensor and on the call count.

One difference, so that a task compiles a few programs rather than one per request length:
scoring batches are right-padded to ``bucket_length`` of their longest row (a power of two
from 16, capped at ``max_length``: at most 8 programs for ``max_length`` 2048, one for
rolling windows at ``max_length``) and a short last batch gets padding rows. Padding changes
no score; under bitflip with ``batch_size > 1`` it moves the flips of the rows after the first
unless the longest row fills its bucket (as full rolling windows do), so the flips equal
HFLM's for batch size 1 and for full-length rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxflip.models import LlamaForCausalLM, generate
from jaxflip.models.decoding import bucket_length
from jaxflip.models.sharding import mesh_context, model_mesh, place_state

# ``Collator.get_cache`` hands each request of a shared-context group the batch row's logits;
# here the scores are looked up per row, so a placeholder stands in for the logits
_ROW_PLACEHOLDER = torch.empty(1, 0, 0)


@nnx.jit
def _score(model: LlamaForCausalLM, inputs: jax.Array, last_positions: jax.Array):
    """For a right-padded batch (B, T): the log-probability of each next input token
    (B, T - 1), the argmax token at every position (B, T), and the whole log-softmax row at
    each sequence's last real position (B, V)."""
    log_probs = jax.nn.log_softmax(model(inputs).astype(jnp.float32), axis=-1)
    next_log_probs = jnp.take_along_axis(log_probs[:, :-1], inputs[:, 1:, None], axis=-1)[..., 0]
    last_rows = log_probs[jnp.arange(inputs.shape[0]), last_positions]
    return next_log_probs, jnp.argmax(log_probs, axis=-1), last_rows


class JaxLM(TemplateLM):
    """lm-eval ``LM`` for a ``LlamaForCausalLM`` (with any bitflip rules already applied).

    ``max_length``: the context window of scoring (default: the model's
    ``max_position_embeddings``, as HFLM reads it from an HF config). ``generate_until`` runs
    one request at a time (the model takes no attention mask, so prompts are not padded).
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer, *, batch_size: int = 1, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model = model
        self.mesh = model_mesh(model)  # the weights' mesh, if sharded: scoring forwards run on it
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options = {"add_special_tokens": False}  # the text carries its own BOS
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log-probabilities of the continuation, whether it is the greedy one)`` per
        ``(strings, context_tokens, continuation_tokens)``."""
        results = []
        ordered = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
                           group_by="contexts", group_fn=lambda req: req[-2] + req[-1][:-1])
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in ordered.get_batched(n=self.batch_size):
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            width = bucket_length(max(len(row) for row in inputs), self.max_length)
            padded = np.zeros((self.batch_size, width), np.int32)  # padding rows: last position 0
            for row, tokens in zip(padded, inputs):
                row[:len(tokens)] = tokens
            lengths = np.ones(self.batch_size, np.int32)
            lengths[:len(inputs)] = [len(tokens) for tokens in inputs]
            place_state(self.model)
            with mesh_context(self.mesh):
                scores = _score(self.model, jax.device_put(padded), jax.device_put(lengths - 1))
            next_log_probs, greedy, last_rows = (np.asarray(a) for a in scores)
            for row, (strings, context, continuation) in enumerate(chunk):
                for _, tokens, _ in ordered.get_cache(req_str=strings, cxt_toks=context, cont_toks=continuation,
                                                      logits=_ROW_PLACEHOLDER):
                    # the continuation's tokens sit at positions start .. end - 1 of the row's targets
                    end = lengths[row]
                    start = end - len(tokens)
                    log_prob = next_log_probs[row, start:end - 1].sum() + last_rows[row, tokens[-1]]
                    is_greedy = bool(np.array_equal(greedy[row, start:end], tokens))
                    results.append((float(log_prob), is_greedy))
                    progress.update(1)
        progress.close()
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint ``max_length`` windows, each window
        scored with the tokens before it as context (HFLM's windows, batched as HFLM does)."""
        windows, counts = [], []
        for (text,) in tqdm([request.args for request in requests], disable=disable_tqdm):
            text_windows = [(None, *window) for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))]
            windows.extend(text_windows)
            counts.append(len(text_windows))
        scores = []
        progress = tqdm(total=len(windows), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            scores.extend(score for score, _ in self._loglikelihood_tokens(batch, disable_tqdm=True))
            progress.update(len(batch))
        progress.close()
        totals, offset = [], 0
        for count in counts:
            totals.append(float(sum(scores[offset:offset + count])))
            offset += count
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        eos = self.tokenizer.decode(self.eot_token_id)
        for context, gen_kwargs in tqdm([request.args for request in requests], disable=disable_tqdm,
                                        desc="Running generate_until requests"):
            options = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            max_gen_toks = options.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a context in max_length "
                                 f"{self.max_length}")
            context_tokens = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
            generated: list[int] = []

            def reached_stop(step_tokens, generated=generated, until=until):
                generated.append(int(step_tokens[0]))
                text = self.tokenizer.decode(generated)
                return any(stop and stop in text for stop in until)

            do_sample = bool(options.get("do_sample")) and options.get("temperature", 0.0) > 0
            generate(self.model, np.asarray([context_tokens], np.int32), max_gen_toks, do_sample=do_sample,
                     temperature=options.get("temperature", 1.0) if do_sample else 1.0, top_k=options.get("top_k"),
                     top_p=options.get("top_p", 1.0), seed=len(results), on_tokens=reached_stop)
            text = postprocess_generated_text(self.tokenizer.decode(generated, skip_special_tokens=True), until, None)
            results.append(text)
        return results
