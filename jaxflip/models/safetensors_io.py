"""safetensors files: read one tensor at a time (``SafetensorsSource``, from the header alone
until a tensor is asked for) and written in shards with their index
(``SafetensorsShardWriter``), as HF transformers lays them out."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxflip.cli import os_error_code
from jaxflip.models.checkpoint_folder import FILE_MODE, umask_mode
from jaxflip.models.tensor_io import BFLOAT16, ConversionError, TensorSource

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BFLOAT16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsSource(TensorSource):
    """The tensors of one or more safetensors files. Each tensor is read with a plain file
    read: ``safe_open`` memory-maps the files, and every page it touches would count as this
    process's memory until the whole model had passed through."""

    def __init__(self, files: list[Path]):
        self.locations = {}  # name -> (file, byte offset, byte count)
        self.shapes, self.dtypes = {}, {}
        for file in files:
            header, data_start = read_safetensors_header(file)
            data_bytes = file.stat().st_size - data_start
            for name, entry in header.items():
                shape, dtype, (begin, end) = safetensors_entry(file, name, entry, data_bytes)
                self.locations[name] = (file, data_start + begin, end - begin)
                self.shapes[name] = shape
                self.dtypes[name] = dtype

    def read(self, name: str) -> np.ndarray:
        # of the byte count in the header: see safetensors_entry
        return self._read_into(name, np.empty(self.shapes[name], self.dtypes[name]), 0)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` alone: the tensor is row-major, so they are one byte range."""
        shape, dtype = self.shapes[name], self.dtypes[name]
        stop = min(stop, shape[0])
        rows = np.empty((max(0, stop - start), *shape[1:]), dtype)
        return self._read_into(name, rows, start * math.prod(shape[1:]) * dtype.itemsize)

    def _read_into(self, name: str, array: np.ndarray, skip: int) -> np.ndarray:
        """Fill ``array`` with the bytes of tensor ``name`` from ``skip`` bytes into it."""
        file, offset, _ = self.locations[name]
        with open(file, "rb") as f:
            f.seek(offset + skip)
            if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                raise ConversionError(f"{file}: ends inside tensor {name}")
        return array


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data offsets) and where the data starts:
    the file is an 8-byte little-endian header length, the JSON header, then the data."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, os.fstat(f.fileno()).st_size - 8):
                raise ValueError(f"a header of {length} bytes, beyond the file or the format's limit")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: not a readable safetensors file (the header is a {type(header).__name__}, "
                              f"not a table of tensors)")
    header.pop("__metadata__", None)
    return header, 8 + length


def safetensors_entry(file: Path, name: str, entry, data_bytes: int) -> tuple[tuple, np.dtype, tuple[int, int]]:
    """``(shape, dtype, (begin, end))`` of one header entry, checked: a known dtype, a shape of
    integers >= 0 whose bytes are ``end - begin``, offsets within the file's ``data_bytes``."""
    def is_index(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict):
        raise ConversionError(f"{file}: header entry {name} is not a table")
    if entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise ConversionError(f"{file}: {name} has dtype {entry.get('dtype')}, which is not supported")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(is_index(size) for size in shape):
        raise ConversionError(f"{file}: {name} has no valid shape (a list of integers >= 0), got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes):
        raise ConversionError(f"{file}: {name} has no valid data_offsets within the file's {data_bytes} data bytes, "
                              f"got {offsets!r}")
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise ConversionError(f"{file}: {name} takes {offsets[1] - offsets[0]} bytes, not the "
                              f"{math.prod(shape) * dtype.itemsize} of its shape {shape} and dtype {entry['dtype']}")
    return tuple(shape), dtype, tuple(offsets)


class SafetensorsShardWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` files of about
    ``max_shard_bytes`` and their ``model.safetensors.index.json`` (one ``model.safetensors``
    when everything fits in one), holding one shard in memory."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.shard: dict[str, np.ndarray] = {}
        self.shard_bytes = self.total_bytes = 0
        self.files: list[list[str]] = []  # the names in each written shard

    def add(self, name: str, array: np.ndarray) -> None:
        if self.shard and self.shard_bytes + array.nbytes > self.max_shard_bytes:
            self._write_shard()
        self.shard[name] = np.ascontiguousarray(array)
        self.shard_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _write_shard(self) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        path = self.folder / f"shard-{len(self.files)}.safetensors"
        try:
            save_file(self.shard, path, metadata={"format": "pt"})
        except SafetensorError as error:  # an OS fault inside its message: "... (os error 28)"
            code = os_error_code(error)
            if code is None:
                raise
            raise OSError(code, f"{os.strerror(code)}: writing {path}") from None
        path.chmod(umask_mode(FILE_MODE))  # safetensors writes its files private (0600), unlike every other file here
        self.files.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0

    def finish(self) -> None:
        if self.shard:
            self._write_shard()
        if len(self.files) == 1:
            os.replace(self.folder / "shard-0.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            file_name = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.safetensors", self.folder / file_name)
            weight_map |= dict.fromkeys(names, file_name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
