"""The bitflip kernel: Pallas on GPU, the same Philox code in jnp or interpret mode elsewhere."""

from jaxflip.kernels_pallas.limits import calculate_flip_probability, find_nearest_prob_n_halves
from jaxflip.kernels_pallas.random_bitflip import random_bitflip

__all__ = ["random_bitflip", "find_nearest_prob_n_halves", "calculate_flip_probability"]
