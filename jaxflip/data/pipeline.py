"""Training batches: documents -> tokens -> packed windows -> batches, resumable, prefetched.

The documents are packed into ``seq_len + 1`` token windows, and ``batch_size`` windows make a
batch: the global batch. Every process of a multi-host run reads this same stream and places
only its own devices' rows (``jax.make_array_from_callback`` in the training loop), so the
rows, their order and the stream's position do not depend on the number of processes: N
processes train on exactly what one process would, and a checkpoint resumes on any process
count. (Splitting the documents between processes would pack different windows, since windows
cross document boundaries; the price is that every process tokenizes every document.)

The order is fixed by the seed (built-in and local sources are permuted by it; every epoch
re-permutes with ``seed + epoch``). ``state()`` is a JSON-able position (the dataset's own
``state_dict``, the tokens carried over to the next window, the epoch): a stream restored from
the state of batch N yields batch N + 1 exactly. A background thread keeps ``prefetch`` batches
ready.
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass

import numpy as np

from jaxflip.data.sources import DataError, load_documents, token_windows


@dataclass(frozen=True)
class StreamSpec:
    source: str
    tokenizer: object
    seq_len: int
    batch_size: int  # sequences per batch, of all processes together
    seed: int = 0
    split: str = "train"
    subset: str | None = None
    text_field: str = "text"


class BatchStream:
    """An endless iterator of int32 ``(batch_size, seq_len + 1)`` batches with a resumable state."""

    def __init__(self, spec: StreamSpec, state: dict | None = None, prefetch: int = 4):
        self.spec = spec
        self._state = copy.deepcopy(state) if state else {"epoch": 0, "dataset": None, "carry": []}
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="jaxflip-data")
        self._thread.start()

    def _documents(self, epoch: int):
        spec = self.spec
        return load_documents(spec.source, split=spec.split, subset=spec.subset, text_field=spec.text_field,
                              shuffle_seed=spec.seed + epoch)

    def _produce(self) -> None:
        try:
            state = copy.deepcopy(self._state)
            while not self._stop.is_set():
                dataset = self._documents(state["epoch"])
                fresh_epoch = state["dataset"] is None
                if not fresh_epoch:
                    dataset.load_state_dict(state["dataset"])
                carry = list(state["carry"])
                texts = (row["text"] for row in dataset)
                rows, produced = [], False
                for window in token_windows(texts, self.spec.tokenizer, self.spec.seq_len, buffer=carry):
                    rows.append(window)
                    if len(rows) == self.spec.batch_size:
                        # the position after this batch: the dataset has handed out every document
                        # whose tokens are in it or in the carry
                        state = {"epoch": state["epoch"], "dataset": copy.deepcopy(dataset.state_dict()), "carry": list(carry)}
                        self._put((np.stack(rows), state))
                        rows, produced = [], True
                        if self._stop.is_set():
                            return
                if not produced and fresh_epoch:
                    raise DataError(f"{self.spec.source}: too little text for one batch of {self.spec.batch_size} "
                                     f"x {self.spec.seq_len + 1} tokens")
                # the epoch ends: the unfinished batch's windows are dropped, the token carry kept
                state = {"epoch": state["epoch"] + 1, "dataset": None, "carry": list(carry)}
        except BaseException as error:  # surfaces in the consumer, not lost in the thread
            self._put(error)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict:
        """The position after the last batch returned by ``next``."""
        return copy.deepcopy(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
