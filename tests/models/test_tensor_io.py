"""Tensors read a device slice at a time, a block of rows at a time."""

import numpy as np
import torch

from jaxflip.models.tensor_io import RowBlockTensor, TorchFileSource, rows_per_block


class CountingSource(TorchFileSource):
    """Records the row ranges read."""

    def __init__(self, state_dict):
        super().__init__([state_dict])
        self.reads = []

    def read_rows(self, name, start, stop):
        self.reads.append(stop - start)
        return super().read_rows(name, start, stop)


def test_a_slice_is_read_in_row_blocks_and_equals_the_tensor_sliced():
    rng = np.random.default_rng()
    array = rng.standard_normal((50, 8)).astype(np.float32)
    source = CountingSource({"w": torch.from_numpy(array)})
    block_bytes = int(rng.integers(40, 200))
    tensor = RowBlockTensor(source, "w", block_bytes)
    for _ in range(5):
        start, stop = sorted(int(x) for x in rng.integers(0, 51, 2))
        first_col, last_col = sorted(int(x) for x in rng.integers(0, 9, 2))
        source.reads.clear()
        piece = tensor.read((slice(start, stop), slice(first_col, last_col)))
        assert np.array_equal(piece, array[start:stop, first_col:last_col])
        assert max(source.reads, default=0) <= rows_per_block(array.shape, array.dtype, block_bytes)
    assert np.array_equal(tensor[3:17], array[3:17])
