"""Where text and tokenizers come from: a local path that cannot be read is an error at once,
naming it; a hub name that cannot be had is one line, read from the cache first, with no
network retries offline."""

import re
import shutil

import huggingface_hub.constants
import numpy as np
import pytest

from jaxflip.data import builtin_tokenizer_dir, load_tokenizer
from jaxflip.data.pipeline import BatchStream, StreamSpec
from jaxflip.data.sources import DataError, HubUnavailableError, check_source, load_documents
from jaxflip.train.__main__ import main as train_main


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


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # and no network in CI


def test_an_uncached_hub_tokenizer_offline_is_one_line_saying_what_to_do(offline):
    with pytest.raises(HubUnavailableError) as raised:
        load_tokenizer("no-such-org/no-such-tokenizer")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("no-such-org/no-such-tokenizer: not a local folder, not in the Hugging Face cache (")
    assert message.endswith("(HF_HUB_OFFLINE is set); download it once online or pass a local folder")


def test_a_cached_hub_tokenizer_loads_without_a_network_call(tmp_path, monkeypatch):
    """A tokenizer in the hub cache layout, as a download leaves it (``snapshots/REV`` with
    the files, ``.no_exist/REV`` marking the ones the hub does not have), is read from there
    without asking the hub (which retries for a minute when the network is down)."""
    import httpx

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network call: {args[1:3]}")

    monkeypatch.setattr(httpx.Client, "request", no_network)
    monkeypatch.setattr(httpx.Client, "send", no_network)
    revision = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hub" / "models--some-org--some-tokenizer"
    shutil.copytree(builtin_tokenizer_dir(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / ".no_exist" / revision).mkdir(parents=True)
    (repo / ".no_exist" / revision / "config.json").touch()
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    tokenizer = load_tokenizer("some-org/some-tokenizer")
    assert len(tokenizer) == len(load_tokenizer("builtin"))


def test_training_with_an_unreachable_hub_tokenizer_ends_with_one_line_and_status_1(offline, tmp_path, capsys):
    code = train_main(["--job.output_dir", str(tmp_path / "run"), "--data.tokenizer", "no-such-org/no-such-tokenizer",
                       "--metrics.progress_bar", "false"])
    error = capsys.readouterr().err
    assert code == 1
    assert error.startswith("error: no-such-org/no-such-tokenizer: not a local folder") and error.count("\n") == 1
