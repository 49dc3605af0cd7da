"""Llama models in Flax NNX (HF layout, bitflip-ready Linears, sharding annotations) and their
checkpoints: open, load and save the jaxflip (Orbax) format, read HF and torchtitan ones."""

from jaxflip.models.checkpoint_formats import open_checkpoint
from jaxflip.models.decoding import generate
from jaxflip.models.flavors import FLAVORS, format_param_counts, get_flavor, param_count
from jaxflip.models.hf_io import llama_from_hf_state_dict
from jaxflip.models.llama import KVCache, LlamaForCausalLM
from jaxflip.models.llama_config import Llama3RopeScaling, LlamaConfig, config_from_hf
from jaxflip.models.orbax_io import load, save

__all__ = [
    "FLAVORS", "KVCache", "Llama3RopeScaling", "LlamaConfig", "LlamaForCausalLM", "config_from_hf",
    "format_param_counts", "generate", "get_flavor", "llama_from_hf_state_dict", "load", "open_checkpoint",
    "param_count", "save",
]
