"""Bitflip layers (mase-triton's ``RandomBitFlipLinear`` and NewComputeBench's LoRA variant),
their seeds as NNX state, NewComputeBench-style rules that configure a whole model, and the
bitflip settings (``BitflipConfig``) with the op's limits."""

from jaxflip.bitflip.config import (MAX_HALVES, SEED_LIMIT, BitflipConfig, calculate_flip_probability, check_seed,
                                    find_nearest_prob_n_halves, flip_halves)
from jaxflip.bitflip.linear import (LM_HEAD, Armed, BitFlipLinear, TensorFlip, flip_shared_input, flip_tensor,
                                    named_linears, replace_module)
from jaxflip.bitflip.lora import BitFlipLoRALinear, LoRAParam, add_lora, merge_lora, merged_weight
from jaxflip.bitflip.rules import (RULE_KEYS, RuleRow, RuleSet, RuleTable, apply_bitflip_rules, apply_rule_table,
                                   arm_for_tables, match_rules)
from jaxflip.bitflip.seeds import BitflipSeed, BitflipState, FlipSetting, independent_seed, seed_snapshot

__all__ = [
    "MAX_HALVES", "SEED_LIMIT", "Armed", "BitFlipLinear", "BitFlipLoRALinear", "BitflipConfig", "BitflipSeed",
    "BitflipState", "FlipSetting", "LM_HEAD", "LoRAParam", "RULE_KEYS", "RuleRow", "RuleSet", "RuleTable", "TensorFlip",
    "add_lora", "apply_bitflip_rules", "apply_rule_table", "arm_for_tables", "calculate_flip_probability",
    "check_seed", "find_nearest_prob_n_halves", "flip_halves",
    "flip_shared_input", "flip_tensor", "independent_seed", "merge_lora", "merged_weight", "match_rules", "named_linears",
    "replace_module", "seed_snapshot",
]
