"""``python -m jaxflip.train --config FILE [--section.field VALUE ...]``

Bitflip-aware pretraining or LoRA, as the config says. ``--print-config`` prints the resolved
config with its derived numbers (parameters, tokens per step, steps for the token budget)
and exits; ``--plan 2x141,4x80`` prints its memory per device on those GPUs
(``jaxflip.train.plan``) and exits. Without ``--config``, the built-in quickstart
(``configs/quickstart.toml``'s settings) runs.

Errors end with one ``error:`` line: exit status 2 for bad input (config, dataset, model
checkpoint, an ``output_dir`` another run holds), 1 for a run that cannot go on (a non-finite
loss, no restorable checkpoint, a signal where no checkpoint could be saved) or a fault of the
environment (disk full, no permission). A run stopped by a signal names the checkpoint the next
run resumes from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from jaxflip.cli import exit_status
from jaxflip.data.sources import DataError, HubUnavailableError
from jaxflip.train.checkpoint_manager import CheckpointError
from jaxflip.train.loop import Interrupted, NonFiniteError, derived_numbers, resume_note, run
from jaxflip.train.metrics import MissingPackageError
from jaxflip.train.plan import DEFAULT_SCENARIOS, Scenario, format_plan, plan
from jaxflip.train.setup import mesh_mismatch
from jaxflip.train.train_config import ConfigError, load_config, to_dict

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.toml"


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (a resumed run skips the minute the CPU spends
    compiling every flip site's Philox); ``JAXFLIP_COMPILATION_CACHE=""`` turns it off."""
    directory = os.environ.get("JAXFLIP_COMPILATION_CACHE", str(Path.home() / ".cache" / "jaxflip" / "xla"))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxflip.train", description="Bitflip-aware pretraining and LoRA on JAX.",
        epilog="Any config field can be overridden: --training.steps 100, --bitflip.enable false, --steps 100.")
    parser.add_argument("--config", help="TOML (or YAML) job config; default: the built-in quickstart")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--plan", nargs="?", const=True, metavar="GPUSxGB,...",
                        help="print the memory per device on N GPUs of G GB each and exit (default: 2x141,4x80,8x80)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.config is None:
            args.config = QUICKSTART
        config = load_config(args.config, overrides)
        if args.plan:
            scenarios = Scenario.parse_list(DEFAULT_SCENARIOS if args.plan is True else args.plan)
            plans = plan(config, scenarios)
            print(format_plan(config, plans))
            print("plan: " + json.dumps([p.summary() for p in plans]))
            return 0
        if args.print_config:
            print(json.dumps(to_dict(config) | {"derived": derived_numbers(config)}, indent=1, default=str))
            if (mismatch := mesh_mismatch(config, jax.device_count())) is not None:
                print(f"warning: training would stop at once: {mismatch}", file=sys.stderr)
            return 0
        enable_compilation_cache()
        summary = run(config)
    except (ConfigError, DataError) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (HubUnavailableError, MissingPackageError) as error:  # the environment, not the config
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, NonFiniteError, Interrupted) as error:  # the run cannot go on
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # a bad model checkpoint or path (2); the disk, permissions (1)
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return exit_status(error)
    if not summary["finished"]:
        if summary["resumes_from"] == summary["step"]:
            print(f"stopped at step {summary['step']} with a checkpoint; run the same command to resume")
        else:
            print(f"stopped at step {summary['step']}; {resume_note(Path(summary['output_dir']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
