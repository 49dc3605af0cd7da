"""``python -m jaxflip.eval {ppl,sweep,profile,generate,lm-eval} --checkpoint PATH ...``; each
command has ``--help``. Errors in the arguments or the files they name end the run with one
line on stderr and exit status 2 (1 for a fault of the environment: an ``--output`` folder that
cannot be written, a full disk); every argument, the bitflip rules and ``--output`` are checked
before the model runs."""

from __future__ import annotations

import argparse
import sys

from jaxflip.bitflip.rules_file import read_bitflip_config
from jaxflip.cli import exit_status
from jaxflip.eval import generate_cli, lm_eval_run, perplexity, profile, sweep
from jaxflip.eval.model_io import resolve_checkpoint
from jaxflip.eval.report import check_output_path, write_json
from jaxflip.models.llama_config import DTYPES

COMMANDS = {
    "ppl": (perplexity, "cross-entropy and perplexity, clean and under bitflip"),
    "sweep": (sweep, "a fault campaign: perplexity over flip settings and seeds, a table and a plot"),
    "profile": (profile, "|x| and |W| percentiles of the Linear layers; zero-out thresholds"),
    "generate": (generate_cli, "continue a prompt, streaming the text"),
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
        args.checkpoint = resolve_checkpoint(args.checkpoint)
        # every argument is checked before the model is opened
        module.check_arguments(args)
        # the settings, read and checked once here (their layers once the model is open)
        args.bitflip = read_bitflip_config(args.bitflip_config) if args.bitflip_config is not None else None
        if args.output is not None:
            check_output_path(args.output)
        payload = module.run(args)
        if args.output is not None:
            write_json(args.output, payload)
    except (ValueError, OSError) as error:  # bad arguments, unreadable or malformed files; the disk
        print(f"{parser.prog} {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return exit_status(error)
    if args.output is not None:
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
