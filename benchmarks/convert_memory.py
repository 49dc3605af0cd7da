"""Peak host memory of the checkpoint converters on a ~1B-parameter model (issue 4), or on
a few layers of a wide one (issue 13: Llama-3-70B's width, 1 layer, hf-to-orbax only).

    python benchmarks/convert_memory.py WORKDIR [--flavor aixsim-1.1B] [--dtype float32]
    python benchmarks/convert_memory.py WORKDIR --flavor llama3-70B --layers 1 --dtype bfloat16 --only hf-to-orbax

Writes a random-weight HF safetensors folder of the flavor (tensor by tensor, sharded at 2 GB
as transformers does), then runs hf-to-orbax, orbax-to-hf, orbax-to-titan and titan-to-orbax,
each in a fresh process, so that each summary line's peak host memory (ru_maxrss) is that
conversion's alone. Also loads the checkpoint with ``jaxflip.models.load`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxflip.models import get_flavor
from jaxflip.models.hf_io import hf_config_dict
from jaxflip.models.named_params import expected_params
from jaxflip.models.tensor_io import format_bytes

SHARD_BYTES = 2 * 10**9


def write_random_hf(folder: Path, flavor: str, dtype: str, layers: int | None = None) -> None:
    config = get_flavor(flavor, param_dtype=dtype, **({"num_hidden_layers": layers} if layers else {}))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shard, shard_bytes, files, weight_map = {}, 0, [], {}

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    largest = max(expected_params(config).values(), key=lambda want: math.prod(want.shape))
    print(f"largest tensor: {largest.shape}, {format_bytes(math.prod(largest.shape) * np.dtype(dtype).itemsize)}")
    for name, want in expected_params(config).items():
        array = (rng.standard_normal(want.shape, np.float32) * 0.02).astype(
            ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        if shard and shard_bytes + array.nbytes > SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = array
        shard_bytes += array.nbytes
    flush()
    index = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in files)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config, dtype)))


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--flavor", default="aixsim-1.1B")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the flavor's)")
    parser.add_argument("--only", choices=("hf-to-orbax",), help="run this conversion alone")
    args = parser.parse_args()
    hf, orbax, hf_back, titan, orbax_back = (args.workdir / name
                                             for name in ("hf", "orbax", "hf_back", "titan", "orbax_back"))
    if not hf.exists():
        write_random_hf(hf, args.flavor, args.dtype, args.layers)
    convert = ["-m", "jaxflip.convert"]
    run(*convert, "hf-to-orbax", str(hf), str(orbax), "--overwrite")
    if args.only:
        return
    run(*convert, "orbax-to-hf", str(orbax), str(hf_back), "--overwrite")
    run(*convert, "orbax-to-titan", str(orbax), str(titan), "--overwrite")
    run(*convert, "titan-to-orbax", str(titan), str(orbax_back), "--overwrite")
    report = "print(f'{what}: peak host memory', format_bytes(peak_host_memory_bytes()))"
    setup = "import torch, jaxflip.models, jaxflip.convert.titan_orbax; from jaxflip.models.tensor_io import *; "
    run("-c", setup + "what = 'imports alone'; " + report)
    run("-c", setup + f"jaxflip.models.load({str(orbax)!r}); what = 'jaxflip.models.load'; " + report)


if __name__ == "__main__":
    main()
