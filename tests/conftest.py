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


import contextlib  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, read_only=False)``: a fresh tmpfs of ``size`` bytes under ``tmp_path``
    (a full or read-only disk, real to every writer, C++ included); skips where mounting is
    not allowed (not root, no Linux). Unmounted after the test."""
    mounted = []

    def mount(size: int, *, read_only: bool = False):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(folder)], check=False)
