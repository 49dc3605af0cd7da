#!/usr/bin/env bash
# Issue 17: FSDP scaling of AICrossSim-CLM 1.1B bitflip pretraining (configs/aixsim-1.1B.toml)
# on 1, 2, 4 and 8 GPUs of one machine (device tool: kind nvidia-h100-x8 or nvidia-h200-x8,
# carry [".whl"]). Built-in corpus and tokenizer (the model keeps its 49,152-token
# vocabulary, so the FLOPs are the recipe's), empty compilation cache.
#   bash benchmarks/gpu_scale.sh throughput  the recipe's 6 x 2048 tokens per GPU on each GPU
#                                            count (weak scaling: tokens/s per GPU, MFU, peak)
#   bash benchmarks/gpu_scale.sh losses      the same global batch (BATCH_GLOBAL, default 8
#                                            sequences of 1024 tokens: 8 x 2048 does not fit
#                                            one 80 GB GPU) on each count: the first 10 losses
#                                            must agree (same data, same flips per element)
#   bash benchmarks/gpu_scale.sh             both (about 9 minutes: near the 10-minute call limit)
# Runs land in $OUT/<run>/ (plan.txt, log.txt, metrics.jsonl); benchmarks/summarize_runs.py
# prints the table and the N-GPU / 1-GPU ratios. COUNTS (default "1 2 4 8"), STEPS
# (default 20; 10 for losses), FLIPS (default true), RUN_TIMEOUT (seconds per run, default 150).
# DRY_RUN=1: on the CPU with 8 host devices, aixsim-debug, 2 steps (checks the script only).
set -uo pipefail
mode=${1:-both}
steps=${STEPS:-20} loss_steps=${STEPS:-10}
if [ -n "${DRY_RUN:-}" ]; then
  : "${OUT:=$(mktemp -d)}"
  export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
  tiny=(--model.flavor aixsim-debug --model.vocab_size 4096 --training.seq_len 64); LOSS_SEQ_LEN=64
  steps=2 loss_steps=2 per_gpu=1 global=8
else
  tiny=(); per_gpu=${BATCH_PER_GPU:-6}; global=${BATCH_GLOBAL:-8}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
# the plan (--plan 1x80) puts 1 GPU at 6 x 2048 near 68 GiB: more than JAX's default 75% of 80 GB
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
source benchmarks/device_env.sh
recipe=(--config configs/aixsim-1.1B.toml --parallelism.fsdp_degree -1 --data.dataset builtin:moby-dick
        --data.tokenizer builtin --training.warmup_steps 10 --bitflip.enable ${FLIPS:-true} "${tiny[@]}")
common=(--job.start_over true --checkpoint.enable false --checkpoint.export_model false --metrics.progress_bar false
        --metrics.plot false --metrics.tensorboard false --training.log_freq 1)

train() {  # train RUN_NAME GPUS ARGS...: plan, then train, in $OUT/RUN_NAME
  local name=$1 count=$2; shift 2
  local visible; visible=$(seq -s, 0 $((count - 1)))
  mkdir -p "$OUT/$name"
  if [ -n "${DRY_RUN:-}" ]; then  # host devices: the count is XLA's, not CUDA's
    local env=(XLA_FLAGS="--xla_force_host_platform_device_count=$count")
  else
    local env=(CUDA_VISIBLE_DEVICES=$visible)
  fi
  env "${env[@]}" python3 -m jaxflip.train "${recipe[@]}" "$@" --plan "${count}x${GPU_GB:-80}" > "$OUT/$name/plan.txt" 2>&1
  date +%s.%N > "$OUT/$name/launch_time"
  env "${env[@]}" JAX_LOG_COMPILES=1 timeout ${RUN_TIMEOUT:-150} python3 -m jaxflip.train "${recipe[@]}" "$@" --job.output_dir "$OUT/$name" \
    "${common[@]}" > "$OUT/$name/log.txt" 2>&1
  echo "$name rc=$?"; grep -E "^step |Error|error:" "$OUT/$name/log.txt" | head -3
}

flips=bitflip-${FLIPS:-true}
for count in ${COUNTS:-1 2 4 8}; do
  if [ "$mode" = throughput ] || [ "$mode" = both ]; then
    train "1.1B-${count}gpu-$flips-weak" "$count" --training.local_batch_size $per_gpu --training.steps $steps
  fi
  if [ "$mode" = losses ] || [ "$mode" = both ]; then
    train "1.1B-${count}gpu-$flips-global$global" "$count" --training.local_batch_size $((global / count)) \
      --training.steps $loss_steps --training.seq_len ${LOSS_SEQ_LEN:-1024}
  fi
done
python3 benchmarks/summarize_runs.py "$OUT"
