"""HF transformers Llama weights -> ``LlamaForCausalLM``.

The Flax module paths are HF's state-dict keys and Linear weights share torch's ``(out, in)``
layout, so every tensor copies over unchanged, one at a time, straight into its (optionally
sharded) place: the randomly initialised model is never materialised.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxflip.bitflip import BitflipSeed
from jaxflip.models.config import LlamaConfig, config_from_hf
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.sharding import state_shardings

# in an HF state dict but not parameters: the tied head repeats embed_tokens.weight
_TIED_HEAD_KEY = "lm_head.weight"


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, bit for bit (numpy has no bfloat16 of its own: view the
    bits). Shares memory with ``tensor`` where it can (memory-mapped files stay lazy)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (exactly, any float dtype) or an array as numpy."""
    return torch_to_numpy(tensor) if hasattr(tensor, "detach") else np.asarray(tensor)


def llama_from_hf_state_dict(config: LlamaConfig | Mapping, state_dict: Mapping, *, mesh: Mesh | None = None) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding the tensors of an HF ``LlamaForCausalLM`` state dict
    (torch tensors or arrays), cast to ``config.param_dtype``.

    ``config``: a ``LlamaConfig`` or an HF config (dict, path or ``transformers`` config; see
    ``config_from_hf``). With ``mesh``, each tensor goes straight to its sharded layout.
    Raises ``ValueError`` on missing, unexpected or mis-shaped tensors.
    """
    if not isinstance(config, LlamaConfig):
        config = config_from_hf(config)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat_state = nnx.to_flat_state(abstract_state)
    keys = {path: ".".join(str(part) for part in path)
            for path, variable in flat_state if not isinstance(variable, BitflipSeed)}
    ignored = {key for key in state_dict if key.endswith("rotary_emb.inv_freq")}  # older HF checkpoints
    if config.tie_word_embeddings:
        ignored.add(_TIED_HEAD_KEY)
    missing = sorted(set(keys.values()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys.values()) - ignored)
    if missing or unexpected:
        raise ValueError(f"HF state dict does not fit the model: missing {missing}, unexpected {unexpected}")

    shardings = {} if mesh is None else dict(nnx.to_flat_state(state_shardings(abstract_state, mesh)))
    loaded = []
    for path, variable in flat_state:
        if path in keys:
            value = _to_numpy(state_dict[keys[path]])
            if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
                raise ValueError(f"{keys[path]!r}: HF tensor holds {value.dtype} values, not floating point; "
                                 f"weights are not cast from integers")
            if value.shape != variable.shape:
                raise ValueError(f"{keys[path]!r}: HF tensor has shape {value.shape}, the model expects {variable.shape}")
        else:  # a bitflip seed
            value = np.zeros(variable.shape, variable.dtype)
        sharding = shardings[path].get_value() if path in shardings else None
        loaded.append((path, variable.replace(jax.device_put(value.astype(variable.dtype), sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
