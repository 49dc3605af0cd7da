"""Bitflip-aware training: ``python -m jaxflip.train --config FILE``."""
