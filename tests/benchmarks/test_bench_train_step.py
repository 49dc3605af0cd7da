"""benchmarks/bench_train_step.py on a tiny config, as the lead runs it on a GPU: one process,
one CPU device, clean and bitflip rows in its JSON as they are measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
# flips in each layer's down_proj only: the jnp Philox of every flip site compiles slowly on CPU
# (all 14 Linears' flips: ~45 s of compile, this 2-core VM); the step is still scanned
ONE_LINEAR_FLIPS = ["--bitflip.skip_patterns", "lm_head,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"]


def bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXFLIP_BITFLIP_BACKEND")}
    env |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}  # one device, this checkout's jaxflip
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_rows_of_clean_and_bitflip(tmp_path):
    out = tmp_path / "rows.json"
    done = bench(tmp_path, "--config", str(ROOT / "configs" / "quickstart.toml"), "--training.seq_len", "32",
                 "--training.local_batch_size", "2", *ONE_LINEAR_FLIPS, "--variants", "clean,bitflip",
                 "--warmup", "1", "--steps", "2", "--window", "1", "--hlo-summary", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["clean", "bitflip"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0, row
        assert row["scanned"] and row["tokens_per_step"] == 2 * 32
        assert row["grad_norm_first"] > 0 and row["grad_norm_last"] > 0  # clipping's input, the 8B loss question
        assert row["hlo"]["ops"]["while"] >= 1  # the scanned layers, forward and backward
    assert rows["clean"]["flips_per_step"] == 0 and rows["clean"]["vs_clean"] == 1
    # each layer's down_proj flips its input and weight once per step (2 layers, no remat)
    assert rows["bitflip"]["flips_per_step"] == 2 * 2
    assert rows["bitflip"]["flip_kernels_hlo"] == 0  # the jnp flips of the CPU are no custom-calls
    assert rows["bitflip"]["vs_clean"] > 0
    assert "bitflip" in done.stdout.splitlines()[-1]  # the table


def test_bad_variant_is_bad_input(tmp_path):
    done = bench(tmp_path, "--config", str(ROOT / "configs" / "quickstart.toml"), "--variants", "clean,nope")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --variants: unknown variant 'nope'")


@pytest.mark.slow  # a child process per variant: 15 s
def test_a_variants_xla_flags_reach_its_child_only(tmp_path):
    out = tmp_path / "rows.json"
    done = bench(tmp_path, "--config", str(ROOT / "configs" / "quickstart.toml"), "--training.seq_len", "16",
                 "--training.local_batch_size", "1", "--variants", "clean,dsfusion+clean", "--isolate",
                 "--warmup", "0", "--steps", "1", "--window", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert "error" not in rows["dsfusion+clean"], rows["dsfusion+clean"]
    assert "--xla_gpu_enable_dynamic_slice_fusion=true" in rows["dsfusion+clean"]["xla_flags"]
    assert "dynamic_slice_fusion" not in rows["clean"]["xla_flags"]


def test_xla_flags_without_isolate_are_bad_input(tmp_path):
    done = bench(tmp_path, "--config", str(ROOT / "configs" / "quickstart.toml"), "--variants", "clean,dsfusion")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: --variants: their XLA flags differ and are read once per process: add --isolate"
