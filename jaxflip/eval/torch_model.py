"""An HF transformers ``LlamaForCausalLM`` holding a jaxflip model's weights: what lm-eval's
HFLM evaluates on the torch path (flips added by ``jaxflip.torch_bridge.transform_model``)."""

from __future__ import annotations

import torch
import transformers

from jaxflip.bitflip import merge_lora
from jaxflip.models import LlamaForCausalLM
from jaxflip.models.hf_io import hf_config_dict
from jaxflip.models.named_params import flat_params, param_state


def hf_torch_model(model: LlamaForCausalLM, device: str | None = None) -> transformers.LlamaForCausalLM:
    """The HF model with ``model``'s weights (LoRA adapters merged into ``model`` first, so
    the flips see ``W + B @ A`` as on the JAX path), in eval mode on ``device`` (default:
    CUDA if torch has it, else CPU). It computes in the parameter dtype: HF has no separate
    compute dtype."""
    merge_lora(model)
    dtype = model.config.param_dtype
    config = transformers.LlamaConfig.from_dict(hf_config_dict(model.config, dtype))
    state_dict = {name: torch.from_dlpack(value) for name, value in flat_params(param_state(model)).items()}
    hf_model = transformers.LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state_dict,
                                                             dtype=getattr(torch, dtype))
    return hf_model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
