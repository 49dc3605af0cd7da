"""jaxflip's bitflips in torch models: the op on torch tensors through DLPack, drop-ins for
mase-triton's ``RandomBitFlipLinear`` and ``RandomBitFlipDropout`` (and its probability helpers
``find_nearest_prob_n_halves`` and ``calculate_flip_probability``), and the regex-rule
transform of whole models.

Importing the bridge leaves the GPU to torch: JAX, whose first op would otherwise preallocate
75% of the card's memory (an H100 went from 78.7 GiB free to 18.5 GiB), allocates on demand
instead (``XLA_PYTHON_CLIENT_PREALLOCATE=false``). This must happen before JAX starts its GPU
backend, so import the bridge (or call ``leave_gpu_to_torch()``) before any JAX computation.
An ``XLA_PYTHON_CLIENT_PREALLOCATE`` already in the environment is kept, and
``JAXFLIP_TORCH_BRIDGE_PREALLOCATE=1`` keeps JAX's default.
"""

import os
import warnings


def leave_gpu_to_torch() -> None:
    """Have JAX allocate GPU memory on demand rather than preallocate (see the module's doc);
    no effect once JAX's backend has started."""
    if os.environ.get("JAXFLIP_TORCH_BRIDGE_PREALLOCATE", "").lower() not in ("1", "true"):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


leave_gpu_to_torch()

from jaxflip.kernels_pallas.limits import calculate_flip_probability, find_nearest_prob_n_halves  # noqa: E402
from jaxflip.torch_bridge.functional import random_bitflip_fn  # noqa: E402
from jaxflip.torch_bridge.layers import RandomBitFlipDropout, RandomBitFlipLinear  # noqa: E402
from jaxflip.torch_bridge.transform import transform_model  # noqa: E402

__all__ = ["RandomBitFlipDropout", "RandomBitFlipLinear", "calculate_flip_probability", "find_nearest_prob_n_halves",
           "leave_gpu_to_torch", "random_bitflip_fn", "transform_model"]


def __getattr__(name):
    # the torch function was named random_bitflip, as the JAX op is; its name is now mase-triton's
    if name == "random_bitflip":
        warnings.warn("jaxflip.torch_bridge.random_bitflip is deprecated: use random_bitflip_fn (mase-triton's "
                      "name; jaxflip.random_bitflip is the JAX op)", DeprecationWarning, stacklevel=2)
        return random_bitflip_fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
