"""Where text comes from: the built-in corpus, local files, or HF hub datasets; and tokenizers.

Every source becomes a ``datasets.IterableDataset`` with a ``text`` column, so training and
evaluation read them one way and resume them one way (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxflip.data.builtin_corpus import BUILTIN_NAME, builtin_documents, builtin_tokenizer_dir

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# suffixes that make a dataset name a file path, never a hub dataset id
FILE_SUFFIXES = (*LOCAL_FORMATS, ".gz", ".csv", ".tsv", ".arrow", ".zst")
BUILTIN_TOKENIZER = "builtin"


class DataError(ValueError):
    """A dataset that cannot be read as asked (missing, of an unsupported format, too short);
    the message names it."""


def looks_like_path(source: str) -> bool:
    """Whether a dataset name can only be a local path: it starts with ``.``, ``/`` or ``~``,
    has more than one ``/`` (hub ids are ``org/name``) or a file suffix. Such a name that
    does not exist is an error at once, not a hub lookup."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
            or Path(source).suffix.lower() in FILE_SUFFIXES)


def check_source(source: str) -> None:
    """Raise ``DataError`` for a local dataset that cannot be read: a path that does not exist,
    an empty folder, files of another format. Hub names pass (they are checked when read)."""
    if source == BUILTIN_NAME or local_format(source) is not None:
        return
    if os.path.exists(source):
        raise DataError(f"{source}: not a .txt, .jsonl, .json or .parquet file (optionally .gz) or a folder of them")
    if looks_like_path(source):
        raise DataError(f"{source}: no such file or folder")


def local_format(path: str | os.PathLike) -> str | None:
    """The ``datasets`` builder for a local file or folder of files, or None if not local."""
    path = Path(path)
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    formats = {LOCAL_FORMATS.get("".join(f.suffixes[-2:-1]) if f.suffix == ".gz" else f.suffix) for f in files}
    formats.discard(None)
    if not files:
        return None
    if len(formats) != 1:
        raise DataError(f"{path}: expected .txt, .jsonl/.json or .parquet files (optionally .gz), found "
                         f"{sorted({f.name for f in files})[:5]}")
    return formats.pop()


def load_documents(source: str, *, split: str = "train", subset: str | None = None, text_field: str = "text",
                   streaming: bool = True, shuffle_seed: int | None = None):
    """An ``IterableDataset`` of documents (column ``text``) from

    * ``"builtin:moby-dick"``: the shipped corpus (``split`` train / validation / all);
    * a local file or folder: ``.txt`` (one document per line; empty lines dropped),
      ``.jsonl`` / ``.json`` / ``.parquet`` (the ``text_field`` column);
    * an HF hub dataset name (``subset`` is its config, e.g. ``sample-100BT``), streamed.

    ``shuffle_seed``: a seeded permutation of the documents (map-style sources: built-in and
    local files; exact, and the resume state stays exact). Hub streams keep their order.
    """
    import datasets

    if source == BUILTIN_NAME:
        dataset = datasets.Dataset.from_dict({"text": builtin_documents(split)})
    elif (builder := local_format(source)) is not None:
        files = [str(f) for f in sorted(Path(source).iterdir())] if Path(source).is_dir() else [source]
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar of the conversion stays on stderr above an error's one line
        try:
            dataset = datasets.load_dataset(builder, data_files={"data": files}, split="data")
        # an empty, binary or malformed file: the builder's message does not name it (an empty
        # JSON file ends the builder's generator early: StopIteration)
        except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as error:
            cause = error.__cause__ or error
            if isinstance(cause, StopIteration):
                raise DataError(f"{source}: holds no documents") from None
            detail = " ".join(str(cause).split()) or type(cause).__name__
            raise DataError(f"{source}: not a readable {builder} dataset ({detail})") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
        dataset = _text_column(dataset, text_field, source)
        if builder == "text":
            dataset = dataset.filter(lambda row: bool(row["text"].strip()))
        if len(dataset) == 0:
            raise DataError(f"{source}: holds no documents")
    else:
        check_source(source)
        dataset = datasets.load_dataset(source, subset, split=split, streaming=streaming)
        return _text_column(dataset, text_field, source)
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    return dataset.to_iterable_dataset()


def _text_column(dataset, text_field: str, source: str):
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"{source}: no {text_field!r} column (columns: {', '.join(columns)}); set the text field")
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset.select_columns(["text"]) if columns is not None else dataset


class HubUnavailableError(OSError):
    """Files that are neither local nor to be had from the Hugging Face Hub (offline and not
    cached, an unknown or gated name); the message is one line that says which and what to do."""


def _hub_unreachable(error: BaseException) -> bool:
    """Whether ``error``, or one of the errors it was raised from, says the hub could not be
    reached (no network, ``HF_HUB_OFFLINE``) and the files are not in the local cache."""
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while error is not None and id(error) not in seen:  # transformers' chains can loop
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.NetworkError,
                              httpx.TimeoutException)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def hub_failure(name: str, error: BaseException) -> HubUnavailableError:
    """One line on why ``name`` could not be loaded from the hub: offline and not cached (with
    what to do), or the hub's own answer (unknown name, gated model...), whitespace collapsed."""
    from huggingface_hub import constants

    if _hub_unreachable(error):
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection"
        return HubUnavailableError(
            f"{name}: not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub "
            f"cannot be reached ({how}); download it once online or pass a local folder")
    return HubUnavailableError(f"{name}: not a local folder, and the Hugging Face Hub says: "
                               f"{type(error).__name__}: {' '.join(str(error).split())}")


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """A ``transformers`` tokenizer by hub name or local path; ``"builtin"`` is the shipped one.
    A hub name is read from the local cache when it is there (no network call, so no retries
    offline); one that cannot be had raises ``HubUnavailableError`` (one line)."""
    from transformers import AutoTokenizer

    if str(name_or_path) == BUILTIN_TOKENIZER:
        name_or_path = builtin_tokenizer_dir()
    if Path(name_or_path).exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:  # no tokenizer files there, or broken ones: transformers names neither
            raise DataError(f"tokenizer {name_or_path}: not a readable tokenizer folder "
                            f"({' '.join(str(error).split())[:300]})") from None
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
        except OSError:  # not cached: ask the hub
            try:
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as error:
                raise hub_failure(str(name_or_path), error) from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no EOS token, which packing appends to every document")
    return tokenizer


TOKENIZE_CHUNK = 64  # documents per tokenizer call: the Rust tokenizer encodes a batch on all cores


def token_windows(texts: Iterable[str], tokenizer, seq_len: int, *, buffer: list[int] | None = None,
                  chunk: int = TOKENIZE_CHUNK) -> Iterator[np.ndarray]:
    """Pack documents into int32 windows of ``seq_len + 1`` tokens (inputs and shifted labels):
    tokenize each (no special tokens), append EOS, concatenate, cut. ``buffer`` holds the
    tokens carried over between windows; the caller may pass its own to save and restore it.

    Documents are tokenized ``chunk`` at a time (one tokenizer call on a thread: a single
    document per call caps a training run near 0.5M tokens/s) and every token of a chunk
    enters ``buffer`` before its first window is cut, so ``buffer`` always holds exactly the
    tokens of the documents taken from ``texts`` that no window has used yet."""
    buffer = [] if buffer is None else buffer
    window = seq_len + 1
    texts = iter(texts)
    while documents := list(itertools.islice(texts, chunk)):
        for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= window:
            packed = np.asarray(buffer[:window], np.int32)
            del buffer[:window]  # before yielding: a caller saving ``buffer`` then sees the carry
            yield packed


def evaluation_windows(tokenizer, *, dataset: str, split: str, subset: str | None, text_field: str, seq_len: int,
                       num_sequences: int) -> np.ndarray:
    """The first ``num_sequences`` packed windows (N, seq_len + 1) of the dataset, or fewer
    when it runs out."""
    documents = load_documents(dataset, split=split, subset=subset, text_field=text_field)
    windows = list(itertools.islice(token_windows((row["text"] for row in documents), tokenizer, seq_len),
                                    num_sequences))
    if not windows:
        raise ValueError(f"{dataset} ({split}) holds fewer than {seq_len + 1} tokens: no sequence to evaluate")
    return np.stack(windows)
