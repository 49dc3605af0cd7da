#!/usr/bin/env bash
# Issue 20: the training step's time, memory and flips on one GPU (benchmarks/bench_train_step.py),
# one device call of about 8 minutes (device tool: one H100, carry [".whl"]):
#   60M  aixsim-60M (configs/aixsim-60M.toml), 16 x 2048 tokens: clean, bitflip (the config's
#        mase-triton reference seeds), bitflip-independent, unrolled-clean, unrolled-bitflip
#   8B   Llama-3.1-8B LoRA (configs/llama3-8b-lora.toml: r 32, bf16 base and compute, 2 x 2048
#        tokens x 4 accumulation) on a random base (no hub there: --model.hf_model_path "" and
#        --model.flavor llama3.1-8B, as gpu_multi.sh): clean and bitflip with the config's remat
#        full, bitflip with remat flips (keeps every flipped tensor: ~34 GiB more, hence
#        --mem-fraction 0.95)
#   scan aixsim-60M as 60M, the scanned step's copies (issue 20 item 5): clean, dsfusion+clean (XLA's
#        dynamic slice fusion), remat-dots+clean, unrolled-clean, dsfusion+bitflip
#   bash benchmarks/gpu_train_step.sh [60M|8B|scan|both]     (default both: 60M and 8B)
# Each variant runs in its own child process (--isolate: its own peak memory; an out-of-memory
# variant is its row's error). Rows: $OUT/train_step_<part>.json, written as each variant ends
# (a timeout keeps the finished ones), with the HLO summary (ops by kind, copy bytes); the table
# at the end of $OUT/train_step_<part>.log. PROFILE=1 also traces 3 steps per variant into
# $OUT/profile_<part>/<variant> (TensorBoard profile plugin / xprof) and puts the top device ops
# in the rows; DUMP_HLO=1 writes each variant's optimized HLO to $OUT/hlo_<part>/.
# TIMEOUT_60M / TIMEOUT_8B / TIMEOUT_SCAN: seconds per part (default 230 / 260 / 270; the call limit is 600).
set -uo pipefail
part=${1:-both}
case "$part" in 60M|8B|scan|both) ;; *) echo "usage: bash benchmarks/gpu_train_step.sh [60M|8B|scan|both]" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
source benchmarks/device_env.sh

bench() {  # bench PART TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  local extra=()
  [ -n "${PROFILE:-}" ] && extra+=(--profile "$OUT/profile_$name")
  [ -n "${DUMP_HLO:-}" ] && extra+=(--dump-hlo "$OUT/hlo_$name")
  timeout "$limit" python3 -W ignore benchmarks/bench_train_step.py --isolate --hlo-summary "${extra[@]}" "$@" \
    --out "$OUT/train_step_$name.json" > "$OUT/train_step_$name.log" 2>&1
  echo "$name rc=$?"; tail -8 "$OUT/train_step_$name.log"
}

if [ "$part" = 60M ] || [ "$part" = both ]; then
  bench 60M "${TIMEOUT_60M:-230}" --config configs/aixsim-60M.toml --training.local_batch_size 16 \
    --parallelism.fsdp_degree -1 --variants clean,bitflip,bitflip-independent,unrolled-clean,unrolled-bitflip \
    --warmup 2 --steps 10 --window 5
fi
if [ "$part" = scan ]; then
  bench scan "${TIMEOUT_SCAN:-270}" --config configs/aixsim-60M.toml --training.local_batch_size 16 \
    --parallelism.fsdp_degree -1 --variants clean,dsfusion+clean,remat-dots+clean,unrolled-clean,dsfusion+bitflip \
    --warmup 2 --steps 10 --window 5
fi
if [ "$part" = 8B ] || [ "$part" = both ]; then
  bench 8B "${TIMEOUT_8B:-260}" --config configs/llama3-8b-lora.toml --model.hf_model_path "" \
    --model.flavor llama3.1-8B --parallelism.fsdp_degree -1 --variants clean,bitflip,remat-flips \
    --warmup 1 --steps 4 --window 2 --mem-fraction 0.95
fi
