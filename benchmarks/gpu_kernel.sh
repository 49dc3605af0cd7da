#!/usr/bin/env bash
# One device call: install the carried wheels, run the kernel parity suite on the GPU
# (jaxflip's Pallas kernel vs mase-triton's kernel on the same GPU), then the benchmark.
# Usage (device tool, carry .whl): bash benchmarks/gpu_kernel.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/kernels_pallas 2>&1 | tee $OUT/gpu_parity.log | tail -25
python3 benchmarks/bench_kernel.py --sweep --out $OUT/bench_kernel.json 2>&1 | tee $OUT/bench_kernel.log
