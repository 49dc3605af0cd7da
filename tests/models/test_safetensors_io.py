"""safetensors files read a tensor, or some of its rows, at a time."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxflip.models.safetensors_io import SafetensorsSource


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_read_rows_reads_just_those_rows(tmp_path, dtype):
    rng = np.random.default_rng()
    tensors = {"before": rng.standard_normal((3, 5)).astype(dtype), "matrix": rng.standard_normal((37, 6)).astype(dtype),
               "cube": rng.standard_normal((9, 4, 3)).astype(dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    source = SafetensorsSource([tmp_path / "model.safetensors"])
    for name, array in tensors.items():
        start = int(rng.integers(0, array.shape[0]))
        stop = int(rng.integers(start, array.shape[0] + 3))  # past the end: clipped, as slicing is
        rows = source.read_rows(name, start, stop)
        assert rows.dtype == array.dtype and np.array_equal(rows, array[start:stop]), (name, start, stop)
        assert np.array_equal(source.read(name), array), name
