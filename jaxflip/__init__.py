"""jaxflip: bitflip-fault simulation for LLMs on JAX and Pallas."""

from jaxflip.kernels_pallas import (
    calculate_flip_probability,
    find_nearest_prob_n_halves,
    random_bitflip,
)

__all__ = ["random_bitflip", "find_nearest_prob_n_halves", "calculate_flip_probability"]
__version__ = "0.1.0"
