"""Llama models in Flax NNX (HF layout, bitflip-ready Linears, sharding annotations)."""

from jaxflip.models.checkpoint import load, save
from jaxflip.models.config import Llama3RopeScaling, LlamaConfig, config_from_hf
from jaxflip.models.flavors import FLAVORS, format_param_counts, get_flavor, param_count
from jaxflip.models.generate import generate
from jaxflip.models.hf import llama_from_hf_state_dict
from jaxflip.models.llama import KVCache, LlamaForCausalLM

__all__ = [
    "FLAVORS", "KVCache", "Llama3RopeScaling", "LlamaConfig", "LlamaForCausalLM", "config_from_hf",
    "format_param_counts", "generate", "get_flavor", "llama_from_hf_state_dict", "load", "param_count", "save",
]
