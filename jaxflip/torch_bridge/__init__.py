"""jaxflip's bitflips in torch models: the op on torch tensors through DLPack, a drop-in for
mase-triton's ``RandomBitFlipLinear``, and the regex-rule transform of whole models."""

from jaxflip.torch_bridge.functional import RandomBitflipFunction, random_bitflip
from jaxflip.torch_bridge.layers import RandomBitFlipLinear
from jaxflip.torch_bridge.transform import transform_model

__all__ = ["RandomBitFlipLinear", "RandomBitflipFunction", "random_bitflip", "transform_model"]
