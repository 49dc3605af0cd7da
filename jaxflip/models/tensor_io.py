"""Tensors read one at a time, exact dtype handling, progress and the summary line: what the
readers and writers of every checkpoint format (``hf_io``, ``titan_io``, ``orbax_io``) share.

A ``TensorSource`` knows every tensor's shape and dtype from headers or metadata alone, so a
reader checks names and shapes against the config before it reads a single weight, and
then holds one tensor (or one output shard) at a time.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Self

import ml_dtypes
import numpy as np

DTYPE_CHOICES = ("keep", "float32", "bfloat16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class ConversionError(ValueError):
    """Bad input (missing file, wrong shapes, unknown keys, unsupported model): the CLI prints
    the message as one ``error:`` line. A ``ValueError``, as the model layer's own checks are."""


class TensorSource:
    """Tensors read one at a time. ``shapes`` and ``dtypes`` come from headers or metadata,
    ``read(name)`` returns one tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError


def resolve_dtype(requested: str, source_dtypes) -> str:
    """The parameter dtype of a conversion. ``keep``: the source's own when it is one of
    float32 or bfloat16 throughout; otherwise (float16, or a mix) float32, which holds each of
    them exactly."""
    if requested not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested != "keep":
        return requested
    kinds = {np.dtype(dtype) for dtype in source_dtypes}
    return "bfloat16" if kinds == {BFLOAT16} else "float32"


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, bit for bit (numpy has no bfloat16 of its own: view the
    bits). Shares memory with ``tensor`` where it can (memory-mapped files stay lazy)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def numpy_dtype(torch_dtype) -> np.dtype:
    """The numpy dtype ``torch_to_numpy`` gives a tensor of ``torch_dtype``."""
    import torch

    return torch_to_numpy(torch.empty(0, dtype=torch_dtype)).dtype


def numpy_to_torch(array: np.ndarray):
    """The inverse of ``torch_to_numpy``."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def load_torch_file(path: str | os.PathLike) -> dict:
    """A ``torch.save`` file, memory-mapped (tensors are read when touched) and with
    ``weights_only=True`` (no code from the file runs)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{path}: cannot be read as a torch.save file of tensors: {first_line}") from None


class TorchFileSource(TensorSource):
    """The tensors of one or more ``torch.save`` state-dict files (memory-mapped)."""

    def __init__(self, state_dicts: list[dict]):
        self.tensors = {name: tensor for state_dict in state_dicts for name, tensor in state_dict.items()}
        self.shapes = {name: tuple(tensor.shape) for name, tensor in self.tensors.items()}
        self.dtypes = {name: numpy_dtype(tensor.dtype) for name, tensor in self.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        return torch_to_numpy(self.tensors[name])


def peak_host_memory_bytes() -> int:
    """The process's peak resident memory so far. On Linux, ``VmHWM`` of /proc/self/status:
    ``ru_maxrss`` is the same figure, except that Linux carries it across ``exec``, so a
    process started from a big one reports at least its parent's size."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class Progress:
    """A progress bar over tensors (on a terminal; a context manager that closes it) and the
    summary line: tensors, parameters, bytes, seconds and the process's peak host memory."""

    def __init__(self, total: int, description: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit="tensor", disable=None, leave=False)
        self.description = description
        self.tensors = self.parameters = self.bytes = 0
        self.start = time.perf_counter()

    def update(self, array) -> None:
        self.tensors += 1
        self.parameters += int(np.prod(array.shape))
        self.bytes += array.nbytes
        self.bar.update()

    def summary(self) -> str:
        return (f"{self.description}: {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{format_bytes(self.bytes)} in {time.perf_counter() - self.start:.1f} s; "
                f"peak host memory {format_bytes(peak_host_memory_bytes())}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()
