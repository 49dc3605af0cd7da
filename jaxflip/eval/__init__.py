"""Evaluation of jaxflip models, clean and under bitflip: perplexity, activation/weight
profiles, generation, and lm-eval through JAX or torch (``python -m jaxflip.eval --help``)."""
