#!/usr/bin/env bash
# Llama-3-70B bitflip LoRA, the shipped config (configs/llama3-70b-lora.toml: r 32, remat full,
# 2 x 2048 tokens x 4 accumulation per GPU) with a random bf16 base (no hub there:
# --model.hf_model_path ""), built-in corpus and tokenizer (the model keeps Llama-3's 128,256
# vocabulary, so the FLOPs are the recipe's), empty compilation cache. Issue 13: 2x H200
# (device tool: kind nvidia-h200-x2, needs_h200 true, carry [".whl"]); issue 17: 4x / 8x 80 GB.
#   FLIPS=true bash benchmarks/gpu_70b.sh    one run per flip setting and call: a 70B run takes
#   FLIPS=false bash benchmarks/gpu_70b.sh   4-8 minutes, the call limit is 10 (default: both)
#   bash benchmarks/gpu_70b.sh resume        6 steps unbroken vs 3 steps, then resumed to 6
#                                            (constant LR after 2 warmup steps: the schedule does
#                                            not depend on --training.steps), bitflip on
# Each run first prints the memory plan for its GPUs (plan.txt), then trains (log.txt,
# metrics.jsonl under $OUT/<run>/); benchmarks/summarize_runs.py prints tokens/s, MFU, peak
# memory (largest of the GPUs), XLA compile seconds of the step, seconds from launch to the
# first step, the losses and the plan's total next to the peak.
# GPUS (default: every visible GPU), GPU_GB (default 141), STEPS (default 20), RUN_TIMEOUT
# (seconds per run, default 480: the plan runs first, and a call ends at 600). DRY_RUN=1: on
# the CPU with GPUS host devices, the tiny aixsim-debug flavor and 2 steps (checks the script,
# not the figures).
set -uo pipefail
mode=${1:-train}
steps=${STEPS:-20}
if [ -n "${DRY_RUN:-}" ]; then
  gpus=${GPUS:-2}; : "${OUT:=$(mktemp -d)}"
  export XLA_FLAGS="--xla_force_host_platform_device_count=$gpus" JAX_PLATFORMS=cpu
  tiny=(--model.flavor aixsim-debug --model.vocab_size 4096 --training.seq_len 64 --training.local_batch_size 1
        --training.gradient_accumulation_steps 2 --lora.r 4)
  steps=2
else
  gpus=${GPUS:-$(nvidia-smi -L | wc -l)}; tiny=()
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
# the 70B step needs ~90 of the H200's 141 GB: more than JAX's default 75% share would leave
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
source benchmarks/device_env.sh
recipe=(--config configs/llama3-70b-lora.toml --model.hf_model_path "" --parallelism.fsdp_degree -1
        --data.dataset builtin:moby-dick --data.tokenizer builtin --training.warmup_steps 2 "${tiny[@]}")
common=(--metrics.progress_bar false --metrics.plot false --metrics.tensorboard false --training.log_freq 1
        --checkpoint.export_model false)

train() {  # train RUN_NAME ARGS...: plan, then train, in $OUT/RUN_NAME
  local name=$1; shift
  mkdir -p "$OUT/$name"
  python3 -m jaxflip.train "${recipe[@]}" "$@" --plan "${gpus}x${GPU_GB:-141}" > "$OUT/$name/plan.txt" 2>&1
  date +%s.%N > "$OUT/$name/launch_time"
  JAX_LOG_COMPILES=1 timeout ${RUN_TIMEOUT:-480} python3 -m jaxflip.train "${recipe[@]}" "$@" --job.output_dir "$OUT/$name" "${common[@]}" \
    >> "$OUT/$name/log.txt" 2>&1
  echo "$name rc=$?"; grep -E "^step |Error|error:" "$OUT/$name/log.txt" | head -4
}

case $mode in
train)
  for flips in ${FLIPS:-true false}; do
    train "70B-lora-${gpus}gpu-bitflip-$flips" --training.steps $steps --bitflip.enable $flips \
      --job.start_over true --checkpoint.enable false
  done ;;
resume)
  resume=(--bitflip.enable true --training.decay constant --training.save_freq 3 --checkpoint.async_save false)
  train "70B-lora-${gpus}gpu-unbroken" --training.steps 6 --job.start_over true "${resume[@]}"
  train "70B-lora-${gpus}gpu-resumed" --training.steps 3 --job.start_over true "${resume[@]}"
  train "70B-lora-${gpus}gpu-resumed" --training.steps 6 "${resume[@]}"
  du -sh "$OUT/70B-lora-${gpus}gpu-resumed/checkpoints"/* ;;
*) echo "usage: bash benchmarks/gpu_70b.sh [train|resume]" >&2; exit 2 ;;
esac
python3 benchmarks/summarize_runs.py "$OUT"
