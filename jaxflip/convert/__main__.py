"""``python -m jaxflip.convert COMMAND SRC DST [options]``: convert Llama checkpoints between
HF transformers, torchtitan and jaxflip (Orbax). ``--help`` after a command lists its options.

Bad input (a missing file, a shape that disagrees with the config, unknown or missing keys, a
model that is not a Llama) ends with one ``error: ...`` line and exit status 2 (1 for a fault
of the environment: disk full, no permission); DST is then left as it was.
"""

from __future__ import annotations

import argparse
import re
import sys

from jaxflip.cli import exit_status, quiet_reported_os_faults
from jaxflip.convert import hf_orbax, titan_orbax
from jaxflip.models.checkpoint_folder import DestinationExistsError, check_not_source
from jaxflip.models.flavors import FLAVORS
from jaxflip.models.tensor_io import DTYPE_CHOICES, ConversionError


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500MiB"``, ``"2e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConversionError(f"not a size: {text!r} (examples: 500MB, 2GiB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def _add_common(parser: argparse.ArgumentParser, src: str, dst: str, *, shard_size: bool) -> None:
    parser.add_argument("src", metavar="SRC", help=src)
    parser.add_argument("dst", metavar="DST", help=dst)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                        help="dtype of the written tensors; keep: the source's (float16 or a mix: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    if shard_size:
        parser.add_argument("--max-shard-size", default="512MiB", type=parse_size,
                            help="bytes per written shard, e.g. 500MB, 2GiB (default 512MiB); writing a shard takes "
                                 "a few times its size in host memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxflip.convert",
                                     description="Convert Llama checkpoints between HF transformers, torchtitan and "
                                                 "jaxflip (Orbax).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    orbax = "a jaxflip checkpoint folder (jaxflip.models.save / load)"

    hf_to_orbax = commands.add_parser("hf-to-orbax", help="HF Llama folder or hub id -> jaxflip checkpoint",
                                      description="Convert an HF transformers Llama (config.json, safetensors single or "
                                                  "sharded, or pytorch_model.bin; tokenizer files) into a jaxflip checkpoint.")
    _add_common(hf_to_orbax, "HF model folder, or a hub id (e.g. meta-llama/Llama-3.1-8B) when online", orbax,
                shard_size=True)

    orbax_to_hf = commands.add_parser("orbax-to-hf", help="jaxflip checkpoint -> HF Llama folder",
                                      description="Convert a jaxflip checkpoint into a folder that transformers' "
                                                  "AutoModelForCausalLM and AutoTokenizer load.")
    _add_common(orbax_to_hf, orbax, "HF model folder to write", shard_size=True)
    orbax_to_hf.add_argument("--merge-lora", action="store_true",
                             help="fold LoRA adapters into W: W + (B @ A) * alpha / r")

    titan_to_orbax = commands.add_parser("titan-to-orbax", help="torchtitan checkpoint -> jaxflip checkpoint",
                                         description="Convert a torchtitan Llama checkpoint (a DCP step folder, or a "
                                                     "torch.save file of {'model': state_dict}; torchtitan 0.3 or "
                                                     "NewComputeBench key names) into a jaxflip checkpoint.")
    _add_common(titan_to_orbax, "DCP folder (with .metadata) or torch.save file", orbax, shard_size=True)
    model = titan_to_orbax.add_mutually_exclusive_group()
    model.add_argument("--flavor", choices=list(FLAVORS), help="the model's flavor (default: the one its shapes match)")
    model.add_argument("--config", metavar="CONFIG_JSON", help="an HF Llama config.json describing the model instead")
    titan_to_orbax.add_argument("--tokenizer", metavar="DIR", help="folder of tokenizer files to bundle")

    orbax_to_titan = commands.add_parser("orbax-to-titan", help="jaxflip checkpoint -> torchtitan DCP folder",
                                         description="Convert a jaxflip checkpoint into a torchtitan DCP folder of "
                                                     "model weights.")
    _add_common(orbax_to_titan, orbax, "DCP folder to write", shard_size=False)
    orbax_to_titan.add_argument("--merge-lora", action="store_true",
                                help="fold LoRA adapters into W: W + (B @ A) * alpha / r")
    orbax_to_titan.add_argument("--key-names", choices=("torchtitan", "legacy"), default="torchtitan",
                                help="torchtitan: 0.3's (attention.qkv_linear.wq, lm_head); legacy: NewComputeBench's "
                                     "older torchtitan (attention.wq, output)")
    return parser


def run(args: argparse.Namespace) -> str:
    """Run the parsed command; returns its summary line."""
    check_not_source(args.src, args.dst)
    if args.command == "hf-to-orbax":
        return hf_orbax.hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                    max_shard_bytes=args.max_shard_size)
    if args.command == "orbax-to-hf":
        return hf_orbax.orbax_to_hf(args.src, args.dst, dtype=args.dtype, merge_lora=args.merge_lora,
                                    overwrite=args.overwrite, max_shard_bytes=args.max_shard_size)
    if args.command == "titan-to-orbax":
        return titan_orbax.titan_to_orbax(args.src, args.dst, flavor=args.flavor, config=args.config,
                                          tokenizer_dir=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite,
                                          max_shard_bytes=args.max_shard_size)
    return titan_orbax.orbax_to_titan(args.src, args.dst, dtype=args.dtype, merge_lora=args.merge_lora,
                                      key_names=args.key_names, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status: 0, or after an ``error:`` line 2 for bad input and 1
    for a fault of the environment (disk full, permissions)."""
    args = build_parser().parse_args(argv)
    quiet_reported_os_faults()  # a full disk is the error's one line, not Orbax's tracebacks first
    try:
        summary = run(args)
    except DestinationExistsError as error:
        print(f"error: {error.path} exists; pass --overwrite to replace it", file=sys.stderr)
        return exit_status(error)
    except (ValueError, OSError) as error:  # ConversionError, the model's checks, paths, the disk
        # library messages can span lines; the contract is one line
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return exit_status(error)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
