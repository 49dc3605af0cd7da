"""Apply NewComputeBench's regex bitflip rules to any torch model (the reference's
``transform_model``), with the same matching and seeds as ``jaxflip.bitflip.apply_bitflip_rules``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from jaxflip.bitflip.linear import TensorFlip
from jaxflip.bitflip.rules import RuleTable, match_rules
from jaxflip.kernels_pallas import calculate_flip_probability
from jaxflip.torch_bridge.layers import RandomBitFlipLinear


def transform_model(model: torch.nn.Module, rules: Mapping, seed_mode: str = "reference", base_seed: int = 0
                    ) -> RuleTable:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``rules`` flip by a
    ``RandomBitFlipLinear`` holding its weights; layers left alone stay as they are. Returns
    which layer got which rule (``match_rules``: full-match regexes, first wins, then
    ``default``; the LM head only when a pattern names it).

    ``seed_mode`` defaults to mase-triton's (``"reference"``: each layer starts from its rule's
    seeds, 0 unless given, so every layer of one rule flips the same positions), as
    ``apply_bitflip_rules`` does. A config file can ask for independent per-layer seeds (a
    ``[bitflip]`` section with ``base_seed``): pass what ``load_bitflip_config`` returns,
    ``transform_model(model, *load_bitflip_config(path, layer_names=...))``, to flip as
    ``python -m jaxflip.eval --bitflip-config path`` does."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    table = match_rules(list(linears), rules, seed_mode, base_seed)
    for row in table:
        if row.flipped:
            layer = RandomBitFlipLinear.from_linear(linears[row.layer], **_settings(row.x_flip, "x"),
                                                    **_settings(row.w_flip, "w"),
                                                    **dict(zip(("x_seed_exp", "x_seed_frac", "w_seed_exp",
                                                                "w_seed_frac"), row.seeds)))
            model.set_submodule(row.layer, layer)
    return table


def _settings(flip: TensorFlip, prefix: str) -> dict:
    """The layer's constructor settings for one tensor; ``0.5 ** halves`` snaps back to
    ``halves`` exactly."""
    return {f"{prefix}_p_exp": calculate_flip_probability(flip.exp_halves),
            f"{prefix}_p_frac": calculate_flip_probability(flip.frac_halves),
            f"{prefix}_zero_out_t": flip.zero_out_t}
