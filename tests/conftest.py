"""Test-session setup that must happen before jax or triton are imported.

* 8 host CPU devices, for the sharding tests (a no-op on GPU machines, which keep their devices).
* ``TRITON_INTERPRET=1`` when no CUDA device is present, so mase-triton's kernels (the referee)
  run on CPU tensors.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
