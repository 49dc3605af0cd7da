"""Text data: the built-in corpus and tokenizer, HF datasets and local files, packing."""

from jaxflip.data.builtin_corpus import BUILTIN_NAME, builtin_documents, builtin_tokenizer_dir
from jaxflip.data.pipeline import BatchStream, StreamSpec
from jaxflip.data.sources import evaluation_windows, load_documents, load_tokenizer, token_windows

__all__ = ["BUILTIN_NAME", "BatchStream", "StreamSpec", "builtin_documents", "builtin_tokenizer_dir", "evaluation_windows", "load_documents", "load_tokenizer",
           "token_windows"]
