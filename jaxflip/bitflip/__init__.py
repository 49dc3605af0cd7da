"""Bitflip layers (mase-triton's ``RandomBitFlipLinear`` and NewComputeBench's LoRA variant),
their seeds as NNX state, and NewComputeBench-style rules that configure a whole model."""

from jaxflip.bitflip.linear import LM_HEAD, BitFlipLinear, TensorFlip, flip_tensor, named_linears, replace_module
from jaxflip.bitflip.lora import BitFlipLoRALinear, LoRAParam, add_lora, merge_lora, merged_weight
from jaxflip.bitflip.rules import RULE_KEYS, RuleRow, RuleTable, apply_bitflip_rules, match_rules
from jaxflip.bitflip.seeds import BitflipSeed, independent_seed, seed_snapshot

__all__ = [
    "BitFlipLinear", "BitFlipLoRALinear", "BitflipSeed", "LM_HEAD", "LoRAParam", "RULE_KEYS", "RuleRow", "RuleTable",
    "TensorFlip", "add_lora", "apply_bitflip_rules", "flip_tensor", "independent_seed", "merge_lora",
    "merged_weight", "match_rules", "named_linears", "replace_module", "seed_snapshot",
]
