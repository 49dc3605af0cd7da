"""Test-session setup that must happen before jax or triton are imported.

* 8 host CPU devices, for the sharding tests (a no-op on GPU machines, which keep their devices).
* ``TRITON_INTERPRET=1`` when no CUDA device is present, so mase-triton's kernels (the referee)
  run on CPU tensors.

And, for every test, float32 matmuls in full float32 (``float32_matmuls_in_float32``); tests
marked ``gpu`` are skipped, with the reason, where there is no CUDA GPU (``pytest -m gpu`` on
one runs exactly them).
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the train CLI turns on a persistent XLA cache (default ~/.cache/jaxflip/xla) for its process:
# one per test session, so that no run reads what an earlier one compiled (a fresh CI machine
# has none) and the suite writes nothing under the user's home
if "JAXFLIP_COMPILATION_CACHE" not in os.environ:
    os.environ["JAXFLIP_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxflip-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXFLIP_COMPILATION_CACHE"], ignore_errors=True)
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import contextlib  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The one skip of the GPU-only tests: they need JAX's gpu backend and torch on CUDA (the
    Pallas kernel compiled, mase-triton's kernels native)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests or (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU for JAX and torch (jax[cuda12]); run `pytest -m gpu` on one")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def float32_matmuls_in_float32():
    """Parity at float32 tolerance needs true float32 matmuls; on GPU XLA would use TF32 (on CPU
    float32 matmuls are full float32 anyway, so the other tests see no change)."""
    with jax.default_matmul_precision("highest"):
        yield


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
