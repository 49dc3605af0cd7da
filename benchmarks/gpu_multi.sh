#!/usr/bin/env bash
# One device call on a 2-GPU machine (issue 11): FSDP scaling, 1 GPU vs 2 GPUs in the same call.
#   bash benchmarks/gpu_multi.sh 60M   aixsim-60M bitflip off and on: 1 GPU (CUDA_VISIBLE_DEVICES=0)
#                                       at 32 x 2048 tokens per step, then 2 GPUs at 16 x 2048 each
#                                       (the same global batch, so the same data and losses)
#   bash benchmarks/gpu_multi.sh 8B    Llama-3.1-8B LoRA (random init), bitflip off and on, 2 GPUs
# Built-in corpus and tokenizer (no network there); 60M keeps its 49,152-token vocabulary, 8B
# its 128,256, so the FLOPs are the real recipes'. Empty compilation cache. Each run's
# metrics.jsonl lands in $OUT/<run>/; benchmarks/summarize_runs.py prints the table.
# STEPS (default 30) and RUN_TIMEOUT (seconds per run, default 420) shorten a call; LOG_FREQ
# (default 1: every loss, for the 1- vs 2-GPU comparison) > 1 measures without a host sync per step;
# FLIPS (default "true false") picks the 60M runs; BATCH_1GPU=16 gives the 1-GPU run the 2-GPU
# run's per-GPU batch (weak scaling) instead of its global batch.
set -uo pipefail
steps=${STEPS:-30}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
source benchmarks/device_env.sh
common=(--job.start_over true --data.dataset builtin:moby-dick --data.tokenizer builtin
        --checkpoint.enable false --checkpoint.export_model false --metrics.progress_bar false
        --metrics.plot false --metrics.tensorboard false --training.log_freq ${LOG_FREQ:-1})

train() {  # train RUN_NAME GPUS ARGS...
  local name=$1 gpus=$2; shift 2
  mkdir -p "$OUT/$name"
  date +%s.%N > "$OUT/$name/launch_time"
  CUDA_VISIBLE_DEVICES=$gpus timeout ${RUN_TIMEOUT:-420} python3 -m jaxflip.train "$@" --job.output_dir "$OUT/$name" "${common[@]}" \
    > "$OUT/$name/log.txt" 2>&1
  echo "$name rc=$?"; grep -v Warning "$OUT/$name/log.txt" | grep -E "step (1|10|20|30) |Error|error" | head -8
}

case ${1:-60M} in
60M)
  for flips in ${FLIPS:-true false}; do
    train "60M-2gpu-bitflip-$flips" 0,1 --config configs/aixsim-60M.toml --training.local_batch_size 16 \
      --training.steps $steps --training.warmup_steps 10 --parallelism.fsdp_degree -1 --bitflip.enable $flips
    train "60M-1gpu-bitflip-$flips" 0 --config configs/aixsim-60M.toml --training.local_batch_size ${BATCH_1GPU:-32} \
      --training.steps $steps --training.warmup_steps 10 --parallelism.fsdp_degree -1 --bitflip.enable $flips
  done ;;
8B)
  for flips in false true; do
    train "8B-lora-2gpu-bitflip-$flips" 0,1 --config configs/llama3-8b-lora.toml --model.hf_model_path "" \
      --model.flavor llama3.1-8B --training.steps $steps --training.warmup_steps 2 --parallelism.fsdp_degree -1 \
      --bitflip.enable $flips
  done ;;
esac
python3 benchmarks/summarize_runs.py "$OUT"
