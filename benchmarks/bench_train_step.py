"""The training step of one config in several variants, in one process: time, memory, flips (issue 20).

    python benchmarks/bench_train_step.py --config configs/aixsim-60M.toml \\
        --variants clean,bitflip,bitflip-independent,unrolled-clean,unrolled-bitflip \\
        --training.local_batch_size 16 --out rows.json [--hlo-summary] [--profile DIR] [--isolate]

Any ``--section.field VALUE`` goes to the config as on the train CLI. A variant is a named set
of overrides on top of them (``VARIANTS``; ``remat-<policy>`` sets ``model.remat``; ``dsfusion``
adds an XLA flag (variants whose flags differ need ``--isolate``); ``a+b`` applies both). Per
variant the model, bitflip rules and train state are built as training builds them
(``jaxflip.train.setup``, ``init_state``: random weights, never the hub), the step is traced,
lowered and compiled (``make_train_step``), run ``--warmup`` times, then timed over windows of
``--window`` steps (one host sync per window, not per step) up to ``--steps`` steps, on one
random batch of token ids. A row per variant, written to ``--out`` as soon as it is measured; a
variant that fails (RESOURCE_EXHAUSTED...) gets its error in its row and the next one runs.

Row fields: ``step_ms`` (median over the windows), ``tokens_per_s``, ``vs_clean`` (step time
/ the ``clean`` row's of the same run: the bitflip tax), ``mfu``, ``peak_gib`` (device 0's
``peak_bytes_in_use``: since the process started, so with ``--isolate`` each variant's own,
else the largest so far), ``compile_s``, ``memory_bytes`` (the compiled step's memory
analysis per device), ``flips_per_step`` (flips one optimizer step runs: the
``bitflip_flipped`` marks of the step's jaxpr, one per flipped tensor and forward, remat's
recomputation included, a scan body's times its length; the same on every backend) and
``flip_kernels_hlo`` (custom-calls of the ``jaxflip_random_bitflip`` kernel in the optimized
HLO, a scan body's once: the Pallas kernel on GPU; 0 on CPU, whose jnp flips are plain XLA ops),
``loss_first`` / ``grad_norm_first`` (the last warmup step's; the norm is gradient clipping's
input) and ``loss_last`` / ``grad_norm_last`` (the last timed step's).
``--hlo-summary`` adds the HLO's ops by kind and its copies' bytes (``jaxflip.train.program_stats``);
``--profile DIR`` traces a few more steps into DIR/<variant> (TensorBoard's profile plugin or
xprof read it) and adds the ops with the most device time, read from the trace's Perfetto JSON.

Exit status 2 for bad input (config, variant names), 0 otherwise (failed variants are rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from jaxflip.kernels_pallas.random_bitflip import FLIPPED_NAME
from jaxflip.models.flavors import param_count
from jaxflip.models.llama import REMAT_POLICIES
from jaxflip.train import setup
from jaxflip.train.metrics import device_memory_gib
from jaxflip.train.program_stats import executed_count, flip_kernel_count, hlo_op_summary, instruction_opcodes
from jaxflip.train.step import (batch_sharding, flops_per_token, init_state, make_optimizer, make_train_step,
                                peak_flops)
from jaxflip.train.train_config import ConfigError, TrainConfig, load_config


@dataclasses.dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...] = ()
    scan_layers: bool = True  # init_state's switch: False keeps the decoder layers a Python loop
    xla_flags: tuple[str, ...] = ()  # added to XLA_FLAGS of the variant's child process (--isolate)

    def __add__(self, other: Variant) -> Variant:
        return Variant(self.overrides + other.overrides, self.scan_layers and other.scan_layers,
                       self.xla_flags + other.xla_flags)


CLEAN = Variant(("--bitflip.enable", "false"))
BITFLIP = Variant(("--bitflip.enable", "true"))  # the config's flips and seeds (the 60M config: mase-triton's)
UNROLLED = Variant(scan_layers=False)
# The scanned clean step's extra time on an H100 (issue 20 item 5) is ~460 memcpy128 per step, the
# copies of each layer's residuals into (forward) and out of (backward) the scan's stacked buffers
# around cuBLAS/cuDNN custom calls, which cannot read or write at a dynamic offset. XLA's dynamic
# slice fusion is meant to let them: this variant measures whether it does.
DYNAMIC_SLICE_FUSION = Variant(xla_flags=("--xla_gpu_enable_dynamic_slice_fusion=true",))
VARIANTS = {
    "clean": CLEAN,
    "bitflip": BITFLIP,
    "bitflip-independent": BITFLIP + Variant(("--bitflip.seed_mode", "independent", "--bitflip.base_seed", "1")),
    "unrolled": UNROLLED,
    "unrolled-clean": UNROLLED + CLEAN,
    "unrolled-bitflip": UNROLLED + BITFLIP,
    "dsfusion": DYNAMIC_SLICE_FUSION,
} | {f"remat-{policy}": Variant(("--model.remat", policy)) for policy in REMAT_POLICIES}


def parse_variant(name: str) -> Variant:
    """A name of ``VARIANTS``, or several joined by ``+`` (applied left to right)."""
    variant = Variant()
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {part!r} (known: {', '.join(VARIANTS)}; join with +)")
        variant = variant + VARIANTS[part]
    return variant


def variant_config(args, overrides: list[str], name: str) -> tuple[TrainConfig, Variant]:
    variant = parse_variant(name)
    config = load_config(args.config, overrides + list(variant.overrides))
    m = config.model
    if m.hf_model_path or m.checkpoint:
        raise ConfigError(f"model.{'hf_model_path' if m.hf_model_path else 'checkpoint'}: the benchmark builds random "
                          f"weights; pass --model.{'hf_model_path' if m.hf_model_path else 'checkpoint'} \"\" and the "
                          f"flavor of those weights (--model.flavor llama3.1-8B for Llama-3.1-8B)")
    return config, variant


def random_batch(config: TrainConfig, mesh, vocab_size: int, seed: int = 0) -> jax.Array:
    """Random token ids ``(accumulation, global batch, seq_len + 1)``, placed as the train loop places a batch."""
    t = config.training
    shape = (t.gradient_accumulation_steps, t.local_batch_size * jax.device_count(), t.seq_len + 1)
    rows = np.random.default_rng(seed).integers(0, vocab_size, shape, dtype=np.int32)
    return jax.make_array_from_callback(shape, batch_sharding(mesh), lambda index: rows[index])


def memory_bytes(compiled) -> dict | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return {name: getattr(memory, f"{name}_size_in_bytes")
            for name in ("argument", "output", "alias", "temp", "generated_code")}


def top_device_ops(trace_dir: Path, hlo_text: str, count: int = 15) -> dict | None:
    """The ops with the most time in the Perfetto trace under ``trace_dir`` (``start_trace``'s
    ``create_perfetto_trace``): complete events summed by name, on the device processes
    (``/device:GPU:0``...: kernels) where there are some, else (the CPU backend runs its ops on
    host threads, among Python's and the runtime's events) the events named after an
    instruction of ``hlo_text`` but loops and calls (their time is their bodies'). None
    without a trace file."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return None
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process_names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process_names.items() if "/device:" in name}
    host_ops = {name for name, op in instruction_opcodes(hlo_text).items()
                if op not in ("while", "conditional", "call")}
    totals, calls = Counter(), Counter()
    for e in events:
        counted = e.get("pid") in device_pids if device_pids else e.get("name") in host_ops
        if e.get("ph") == "X" and "dur" in e and counted:
            totals[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    total = sum(totals.values())
    return {"source": "device processes" if device_pids else "host threads, HLO instructions (no device in the trace)",
            "total_ms": total / 1e3,
            "ops": [{"name": name[:120], "ms": us / 1e3, "calls": calls[name], "share": us / total if total else 0}
                    for name, us in totals.most_common(count)]}


def measure(args, name: str, config: TrainConfig, variant: Variant) -> dict:
    """One variant's row (see the module docstring)."""
    t = config.training
    row = {"variant": name, "overrides": list(variant.overrides), "scan_layers_asked": variant.scan_layers,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    start = time.perf_counter()
    mesh = setup.build_mesh(config)
    model, _ = setup.build_model(config, mesh)
    setup.apply_bitflip(config, model)
    model_config = model.config
    tx = make_optimizer(t)
    graphdef, state, shardings, scanned = init_state(model, tx, mesh, config.lora.r > 0,
                                                     scan_layers=variant.scan_layers)
    del model
    step = make_train_step(graphdef, tx, t, shardings, batch_sharding(mesh))
    batch = random_batch(config, mesh, model_config.vocab_size)
    jax.block_until_ready(state)
    built = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = step.jitted.trace(state, batch)
        lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    hlo = compiled.as_text()
    tokens_per_step = math.prod(batch.shape[:2]) * t.seq_len
    row |= {"scanned": scanned, "layers": model_config.num_hidden_layers, "devices": jax.device_count(),
            "device": jax.devices()[0].device_kind, "tokens_per_step": tokens_per_step,
            "params": param_count(model_config), "remat": config.model.remat, "bitflip": config.bitflip.enable,
            "build_s": built - start, "trace_lower_s": lowered_at - built, "compile_s": compiled_at - lowered_at,
            "memory_bytes": memory_bytes(compiled),
            "flips_per_step": executed_count(traced.jaxpr.jaxpr, "name", name=FLIPPED_NAME),
            "flip_kernels_hlo": flip_kernel_count(hlo)}
    if args.hlo_summary:
        row["hlo"] = hlo_op_summary(hlo)
    if args.dump_hlo:
        Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
        (Path(args.dump_hlo) / f"{name}.hlo.txt").write_text(hlo)
    del traced, lowered

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    if args.warmup:
        row |= {"loss_first": float(metrics["loss"]), "grad_norm_first": float(metrics["grad_norm"])}
    windows = []
    for _ in range(max(1, math.ceil(args.steps / args.window))):
        window_start = time.perf_counter()
        for _ in range(args.window):
            state, metrics = compiled(state, batch)
        # the loss is an output of the same program as the new state: ready when the step is done
        jax.block_until_ready(metrics["loss"])
        windows.append((time.perf_counter() - window_start) / args.window)
    step_s = statistics.median(windows)
    tokens_per_s = tokens_per_step / step_s
    peak = peak_flops(jax.devices()[0])
    row |= {"step_ms": step_s * 1e3, "step_ms_windows": [w * 1e3 for w in windows], "tokens_per_s": tokens_per_s,
            "mfu": (tokens_per_s * flops_per_token(model_config, t.seq_len, config.lora.r > 0)
                    / (peak * jax.device_count()) if peak else None),
            "loss_last": float(metrics["loss"]), "grad_norm_last": float(metrics["grad_norm"]),
            "peak_gib": device_memory_gib()}
    if args.profile:
        trace_dir = Path(args.profile) / name
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        for _ in range(args.profile_steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()
        row["profile_dir"] = str(trace_dir)
        row["top_ops"] = top_device_ops(trace_dir, hlo)
    return row


def error_row(name: str, error: BaseException | str) -> dict:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"variant": name, "error": " ".join(text.split())[:2000]}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each timed row's step time over the clean row's (None without a clean row)."""
    clean = next((r for r in rows if r["variant"] == "clean" and "step_ms" in r), None)
    for r in rows:
        if "step_ms" in r:
            r["vs_clean"] = r["step_ms"] / clean["step_ms"] if clean else None
    return rows


def write_rows(path: str | None, meta: dict, rows: list[dict]) -> None:
    """``--out``, replaced whole each time (a crash keeps the rows written before)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"meta": meta, "rows": with_ratios(rows)}, indent=1, default=str))
    partial.replace(path)


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def format_table(rows: list[dict]) -> str:
    header = (f"{'variant':<26} {'step ms':>9} {'tok/s':>10} {'vs clean':>8} {'MFU':>6} {'peak GiB':>8} "
              f"{'compile s':>9} {'flips':>6} {'kernels':>7} {'arg/out/temp GiB':>18}")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<26} error: {r['error'][:160]}")
            continue
        mem = r.get("memory_bytes") or {}
        ratio = "-" if r.get("vs_clean") is None else f"{r['vs_clean']:.2f}x"
        lines.append(
            f"{r['variant']:<26} {r['step_ms']:>9.2f} {r['tokens_per_s']:>10,.0f} {ratio:>8} "
            f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%'):>6} "
            f"{'-' if r['peak_gib'] is None else format(r['peak_gib'], '.2f'):>8} {r['compile_s']:>9.1f} "
            f"{r['flips_per_step']:>6} {r['flip_kernels_hlo']:>7} "
            f"{gib(mem.get('argument')) + '/' + gib(mem.get('output')) + '/' + gib(mem.get('temp')):>18}")
    return "\n".join(lines)


def with_xla_flags(flags: str, extra: tuple[str, ...]) -> str:
    """``flags`` (an XLA_FLAGS value) with each of ``extra`` it lacks."""
    return " ".join([*flags.split(), *(flag for flag in extra if flag not in flags.split())])


def run_isolated(args, overrides: list[str], name: str) -> dict:
    """The variant in a child process of this script: its own device memory peak, and a crash
    (even one that takes the process) is its row's error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--config", args.config, "--variants", name, "--out", str(out),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--window", str(args.window),
                   "--profile-steps", str(args.profile_steps), *(["--hlo-summary"] if args.hlo_summary else []),
                   *(["--profile", args.profile] if args.profile else []),
                   *(["--dump-hlo", args.dump_hlo] if args.dump_hlo else []),
                   *(["--mem-fraction", args.mem_fraction] if args.mem_fraction else []), *overrides]
        flags = with_xla_flags(os.environ.get("XLA_FLAGS", ""), parse_variant(name).xla_flags)
        env = os.environ | {"XLA_FLAGS": flags}
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    if rows:
        return rows[0]
    tail = [line for line in done.stdout.splitlines() if line.strip()][-3:]
    return error_row(name, f"child exited {done.returncode}: {' | '.join(tail)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML (or YAML) job config")
    parser.add_argument("--variants", default="clean,bitflip",
                        help=f"comma-separated: {', '.join(VARIANTS)}, or several joined by + (default: clean,bitflip)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--window", type=int, default=5, help="steps per timed window, one host sync each (default 5)")
    parser.add_argument("--out", help="JSON file of the rows, rewritten after each variant")
    parser.add_argument("--hlo-summary", action="store_true", help="count the optimized HLO's ops and copy bytes")
    parser.add_argument("--dump-hlo", metavar="DIR", help="write each variant's optimized HLO to DIR/<variant>.hlo.txt")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace --profile-steps more steps of each variant into DIR/<variant>")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--mem-fraction", help="XLA_PYTHON_CLIENT_MEM_FRACTION for this process (default: JAX's)")
    parser.add_argument("--isolate", action="store_true",
                        help="each variant in a child process (its own memory peak; a crash is its row)")
    args, overrides = parser.parse_known_args(argv)
    try:
        for name, value in (("--warmup", args.warmup), ("--steps", args.steps), ("--window", args.window),
                            ("--profile-steps", args.profile_steps)):
            if value < (0 if name == "--warmup" else 1):
                raise ConfigError(f"{name}: expected an integer >= {0 if name == '--warmup' else 1}, got {value}")
        if args.mem_fraction and not 0 < float(args.mem_fraction) <= 1:
            raise ConfigError(f"--mem-fraction: expected a number in (0, 1], got {args.mem_fraction}")
        names = [v for v in args.variants.split(",") if v]
        if not names:
            raise ConfigError("--variants: expected at least one variant")
        configs = {name: variant_config(args, overrides, name) for name in names}  # every config checked first
        flag_sets = {variant.xla_flags for _, variant in configs.values()}
        if len(flag_sets) > 1 and not args.isolate:
            raise ConfigError("--variants: their XLA flags differ and are read once per process: add --isolate")
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.mem_fraction:  # read when the backend starts, at the first device query below
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = args.mem_fraction
    if not args.isolate:  # as the mem fraction; with --isolate each child sets its own
        os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), next(iter(flag_sets)))
    meta = {"config": args.config, "overrides": overrides, "warmup": args.warmup, "steps": args.steps,
            "window": args.window, "isolate": args.isolate, "jax": jax.__version__,
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "bitflip_backend": os.environ.get("JAXFLIP_BITFLIP_BACKEND", "default")}
    if not args.isolate:
        meta |= {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    print(f"jax {jax.__version__}; {args.config} {' '.join(overrides)}; variants {', '.join(names)}", flush=True)
    rows = []
    for name in names:
        if args.isolate:
            row = run_isolated(args, overrides, name)
        else:
            try:
                row = measure(args, name, *configs[name])
            except Exception as error:  # noqa: BLE001 -- one variant's failure (out of memory...) is its row
                row = error_row(name, error)
            gc.collect()  # the variant's state and executable go before the next is built
        rows.append(row)
        write_rows(args.out, meta, rows)
        print(format_table(rows).splitlines()[-1], flush=True)
    print(format_table(with_ratios(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
