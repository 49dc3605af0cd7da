"""Packing and the resumable batch stream, on the built-in corpus and tokenizer."""

import itertools

import numpy as np
import pytest

from jaxflip.data import load_documents, load_tokenizer, token_windows
from jaxflip.data.pipeline import BatchStream, StreamSpec


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def random_texts(rng, count):
    words = ["whale", "sea", "Ahab", "the", "of", "harpoon", "ship", "white", "Ishmael", "call", "me"]
    return [" ".join(rng.choice(words, rng.integers(1, 400))) for _ in range(count)]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_windows_are_the_documents_concatenated_with_eos_and_cut(tokenizer, chunk):
    texts = random_texts(np.random.default_rng(), 50)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seq_len = 37
    expected = [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len + 1)]
    carry = []
    windows = list(token_windows(texts, tokenizer, seq_len, buffer=carry, chunk=chunk))
    assert [w.tolist() for w in windows] == expected
    assert carry == stream[len(expected) * (seq_len + 1):]


def test_a_stream_restored_from_batch_n_yields_batch_n_plus_1_across_epochs(tokenizer):
    """The built-in corpus holds ~150 windows of 2049 tokens: 12 batches of 16 cross an epoch."""
    spec = StreamSpec("builtin:moby-dick", tokenizer, seq_len=2048, batch_size=16, seed=int(np.random.default_rng().integers(1000)))
    unbroken = BatchStream(spec, prefetch=2)
    batches, states = [], []
    for _ in range(12):
        batches.append(next(unbroken))
        states.append(unbroken.state())
    unbroken.close()
    assert states[-1]["epoch"] >= 1
    for n in (2, 9):
        resumed = BatchStream(spec, state=states[n], prefetch=2)
        for expected in batches[n + 1:n + 3]:
            np.testing.assert_array_equal(next(resumed), expected)
        resumed.close()


def test_the_first_windows_of_the_corpus_are_its_first_documents(tokenizer):
    documents = load_documents("builtin:moby-dick", split="validation", subset=None, text_field="text")
    first = next(iter(documents))["text"]
    window = next(token_windows((row["text"] for row in documents), tokenizer, 16))
    assert window.tolist() == tokenizer(first, add_special_tokens=False)["input_ids"][:17]
    assert list(itertools.islice(token_windows([], tokenizer, 16), 1)) == []
