"""Documents and scoring of the ``moby_dick`` lm-eval task."""

import re

import datasets

from jaxflip.data import builtin_documents


def load_dataset(**metadata) -> datasets.DatasetDict:
    """The held-out chapters, one document (``page``) each; lm-eval passes the task's
    metadata, which this task does not need."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"page": builtin_documents("validation")})})


def process_results(doc, results):
    """Word and byte counts for lm-eval's weighted perplexities, as wikitext's task does."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
