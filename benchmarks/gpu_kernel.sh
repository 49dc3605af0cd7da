#!/usr/bin/env bash
# The kernel on one GPU, in one device call per part (each fits the 10-minute limit):
#   bash benchmarks/gpu_kernel.sh parity   # tests/kernels_pallas + tests/torch_bridge (gpu tests too): vs mase-triton, bit for bit
#   bash benchmarks/gpu_kernel.sh gpu      # only the gpu-marked tests of both (97: compiled kernel, bridge, torch.compile)
#   bash benchmarks/gpu_kernel.sh bench    # benchmarks/bench_kernel.py: every dtype and halves, sweep of launches and modes
#   bash benchmarks/gpu_kernel.sh quick    # bf16 only: launch sweep + table (~3 min), then the gpu kernel tests of the
#                                          # default launch (~1 min)
# Usage (device tool, carry .whl): bash benchmarks/gpu_kernel.sh PART
set -uo pipefail
part=${1:-}
case "$part" in parity|gpu|bench|quick) ;; *) echo "usage: bash benchmarks/gpu_kernel.sh parity|gpu|bench|quick" >&2; exit 2 ;; esac
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)"
if [ "$part" = parity ]; then
  # every kernel and bridge test, the gpu-marked ones included (compiled kernel and bridge vs mase-triton's CUDA kernels)
  python3 -m pytest -q -p no:cacheprovider tests/kernels_pallas tests/torch_bridge 2>&1 | tee $OUT/gpu_parity.log | tail -25
elif [ "$part" = gpu ]; then
  timeout 540 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels_pallas tests/torch_bridge 2>&1 \
    | tee $OUT/gpu_parity.log | tail -25
elif [ "$part" = quick ]; then
  timeout 320 python3 -W ignore benchmarks/bench_kernel.py --dtypes bfloat16 --reps 15 --sweep-halves 1,8,16,24 \
    --launches 256/8/dense,512/1/per_element,1024/1/per_element,2048/2/per_element --halves 1,4,8,12,16,24 \
    --out $OUT/bench_kernel.json 2>&1 | tee $OUT/bench_kernel.log
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/kernels_pallas/test_kernel.py \
    -k "default" 2>&1 | tee $OUT/gpu_parity.log | tail -8
else
  python3 -W ignore benchmarks/bench_kernel.py --sweep-halves "" --out $OUT/bench_kernel.json 2>&1 | tee $OUT/bench_kernel.log
fi
