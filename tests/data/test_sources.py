"""Where text comes from: a local path that cannot be read is an error at once, naming it."""

import re

import numpy as np
import pytest

from jaxflip.data import load_tokenizer
from jaxflip.data.pipeline import BatchStream, StreamSpec
from jaxflip.data.sources import DataError, check_source, load_documents


@pytest.mark.parametrize("name", ["data/absent.jsonl", "./corpus", "../corpus", "/no/such/folder", "a/b/c",
                                  "corpus.txt", "corpus.csv"])
def test_a_missing_path_is_refused_without_a_hub_lookup(name, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("looked up on the hub"))
    with pytest.raises(DataError, match=f"^{re.escape(name)}: no such file or folder$"):
        load_documents(name)


@pytest.mark.parametrize("name", ["HuggingFaceFW/fineweb-edu", "wikitext", "allenai/dolma-v1.7"])
def test_hub_names_pass_the_local_check(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_source(name)  # no error: these are read from the hub


def test_files_of_another_format_are_refused(tmp_path):
    (tmp_path / "corpus.csv").write_text("text\nCall me Ishmael.\n")
    with pytest.raises(DataError, match=r"expected .txt, .jsonl/.json or .parquet files .*corpus.csv"):
        check_source(str(tmp_path / "corpus.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a .txt, .jsonl, .json or .parquet file"):
        check_source(str(tmp_path / "empty"))


def test_an_empty_or_short_text_file_is_an_error_of_the_stream(tmp_path):
    rng = np.random.default_rng()
    (tmp_path / "empty.txt").write_text("\n" * int(rng.integers(1, 20)))
    (tmp_path / "short.txt").write_text("Call me Ishmael.\n")
    tokenizer = load_tokenizer("builtin")
    for name, message in [("empty.txt", "holds no documents"), ("short.txt", "too little text for one batch")]:
        stream = BatchStream(StreamSpec(str(tmp_path / name), tokenizer, seq_len=int(rng.integers(64, 128)),
                                        batch_size=2))
        with pytest.raises(DataError, match=message):
            next(stream)
        stream.close()
