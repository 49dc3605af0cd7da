"""safetensors files read a tensor, or some of its rows, at a time."""

import os
import stat

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxflip.models.safetensors_io import SafetensorsShardWriter, SafetensorsSource


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


@pytest.mark.parametrize("shards", [1, 3])
def test_written_files_get_the_mode_of_any_new_file_under_the_umask(tmp_path, shards):
    """safetensors writes its files 0600: the writer gives them what ``open`` gives any new file
    (0644 under umask 022), like the config and tokenizer files beside them."""
    rng = np.random.default_rng()
    umask = int(rng.choice([0o022, 0o027, 0o002]))
    tensors = {f"t{i}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(shards)}
    previous = os.umask(umask)
    try:
        writer = SafetensorsShardWriter(tmp_path, max_shard_bytes=4 * 8 * 4)  # one tensor per shard
        for name, array in tensors.items():
            writer.add(name, array)
        writer.finish()
        (tmp_path / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    written = sorted(tmp_path.glob("*.safetensors"))
    assert len(written) == shards
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
    assert modes == dict.fromkeys(modes, stat.S_IMODE((tmp_path / "config.json").stat().st_mode))
    assert set(modes.values()) == {0o666 & ~umask}
