"""``python -m jaxflip.eval {ppl,profile,generate,lm-eval} --checkpoint PATH ...``; each
command has ``--help``. Errors in the arguments or the files they name end the run with one
line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxflip.eval import generation, lm_eval_run, perplexity, profile
from jaxflip.eval.report import write_json
from jaxflip.models.config import DTYPES

COMMANDS = {
    "ppl": (perplexity, "cross-entropy and perplexity, clean and under bitflip"),
    "profile": (profile, "|x| and |W| percentiles of the Linear layers; zero-out thresholds"),
    "generate": (generation, "continue a prompt, streaming the text"),
    "lm-eval": (lm_eval_run, "lm-eval tasks through the JAX or the torch path"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxflip.eval",
                                     description="Evaluate a jaxflip or HF Llama checkpoint, clean or under bitflip.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=module.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--checkpoint", required=True,
                             help="a jaxflip checkpoint folder or an HF model folder (or hub name)")
        command.add_argument("--bitflip-config", default=None,
                             help="TOML/YAML with NewComputeBench regex rules or a [bitflip] section; "
                                  "without it the model runs clean")
        command.add_argument("--output", default=None, help="write the results as JSON here")
        command.add_argument("--tokenizer", default=None,
                             help="tokenizer path, hub name or 'builtin' (default: the checkpoint's)")
        command.add_argument("--dtype", choices=DTYPES, default=None,
                             help="parameter and compute dtype (default: the checkpoint's)")
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, _ = COMMANDS[args.command]
    try:
        if args.bitflip_config is not None and not Path(args.bitflip_config).is_file():
            raise ValueError(f"bitflip config {args.bitflip_config} does not exist")
        module.check_arguments(args)
        payload = module.run(args)
    except (ValueError, OSError) as error:  # bad arguments, unreadable or malformed files
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    if args.output is not None:
        write_json(args.output, payload)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
