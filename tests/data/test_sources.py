"""Where tokenizers come from: a hub name that cannot be had is one line, read from the cache
first, with no network retries offline."""

import shutil

import huggingface_hub.constants
import pytest

from jaxflip.data import builtin_tokenizer_dir, load_tokenizer
from jaxflip.data.sources import HubUnavailableError
from jaxflip.train.__main__ import main as train_main


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
