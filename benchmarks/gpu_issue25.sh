#!/usr/bin/env bash
# Issue 25 on one GPU, one device call per part (each within the 10-minute limit):
#   bash benchmarks/gpu_issue25.sh bench    # run-time vs static kernel vs mase (bench_kernel_settings.py), then
#                                           # bench_sweep.py (6 x 8 sweep vs one compile + 48 forwards; per-layer map)
#   bash benchmarks/gpu_issue25.sh kernel   # the gpu-marked kernel tests (compiled kernel vs mase-triton, bit for bit)
#   bash benchmarks/gpu_issue25.sh bridge   # the gpu-marked torch-bridge tests
# Usage (device tool, carry [".whl", ".static_kernel"]; `bash benchmarks/static_kernel.sh .static_kernel` first)
set -uo pipefail
part=${1:-}
case "$part" in bench|kernel|bridge) ;; *) echo "usage: bash benchmarks/gpu_issue25.sh bench|kernel|bridge" >&2; exit 2 ;; esac
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$part" = bench ]; then
  timeout 260 python3 -W ignore benchmarks/bench_kernel_settings.py --static .static_kernel --reps 15 \
    --out $OUT/bench_kernel_settings.json 2>&1 | tee $OUT/bench_kernel_settings.log
  timeout 290 python3 -W ignore benchmarks/bench_sweep.py --out $OUT/bench_sweep.json 2>&1 \
    | grep -v "^sweep: *[0-9]" | tee $OUT/bench_sweep.log
elif [ "$part" = kernel ]; then
  timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_pallas 2>&1 | tee $OUT/gpu_kernel.log | tail -25
else
  timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu tests/torch_bridge 2>&1 | tee $OUT/gpu_bridge.log | tail -25
fi
