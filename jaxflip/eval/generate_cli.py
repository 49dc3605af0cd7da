"""``generate``: continue a prompt, greedy or sampled, with or without bitflip, printing the
text as it comes (NewComputeBench's ``hf-gen``)."""

from __future__ import annotations

import sys

import numpy as np

from jaxflip.eval.model_io import open_model, open_tokenizer, resolve_bitflip
from jaxflip.models import generate


class TextStream:
    """Prints the decoded text of the tokens so far, each time only what is new (a token
    can end inside a multi-byte character, so decoding token by token would garble it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, step_tokens: np.ndarray) -> None:
        self.tokens.append(int(step_tokens[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):  # hold back a half character
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")


def check_arguments(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise ValueError("the prompt is empty")


def run(args) -> dict:
    model, tokenizer_dir = open_model(args.checkpoint, dtype=args.dtype)
    tokenizer = open_tokenizer(args.tokenizer, tokenizer_dir, args.checkpoint)
    payload = {"command": "generate", "checkpoint": args.checkpoint, "prompt": args.prompt,
               "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if (bitflip := resolve_bitflip(model, args)) is not None:
        payload["bitflip"] = bitflip.apply(model).summary()
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    positions = model.config.max_position_embeddings
    if len(prompt_ids) + args.max_new_tokens > positions:  # RoPE past the trained positions: no sensible text
        raise ValueError(f"the prompt is {len(prompt_ids):,} tokens; with --max-new-tokens {args.max_new_tokens} "
                         f"that passes the model's {positions:,} positions (max_position_embeddings); shorten it")
    stream = TextStream(tokenizer)
    sys.stdout.write(args.prompt)
    tokens = generate(model, np.asarray([prompt_ids], np.int32), args.max_new_tokens, do_sample=args.do_sample,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      eos_token_id=tokenizer.eos_token_id, on_tokens=stream)
    generated = [int(t) for t in np.asarray(tokens[0, len(prompt_ids):])]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    sys.stdout.write(text[len(stream.printed):] + "\n")
    return payload | {"generated_tokens": generated, "text": text}
