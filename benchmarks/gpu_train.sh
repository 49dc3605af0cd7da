#!/usr/bin/env bash
# One device call (issue 5): aixsim-60M bitflip pretraining tokens/s on one GPU, bitflip off
# and on, 16 x 2048 tokens per step (REFERENCE.md's torch recipe: 208,700 / 80,200 tok/s).
# The built-in corpus and tokenizer stand in for FineWeb-Edu / cosmo2 (no network there);
# the model keeps its 49,152-token vocabulary, so the FLOPs are the real recipe's.
# Usage (device tool, carry .whl): bash benchmarks/gpu_train.sh
set -uo pipefail
source benchmarks/device_env.sh
for flips in false true; do
  python3 -m jaxflip.train --config configs/aixsim-60M.toml --job.output_dir "$OUT/60M-bitflip-$flips" \
    --job.start_over true --parallelism.fsdp_degree -1 --training.local_batch_size 16 \
    --training.steps 60 --training.log_freq 10 --training.warmup_steps 10 --bitflip.enable $flips \
    --data.dataset builtin:moby-dick --data.tokenizer builtin --checkpoint.enable false \
    --checkpoint.export_model false --metrics.progress_bar false 2>&1 | grep -v Warning | tail -12
done
