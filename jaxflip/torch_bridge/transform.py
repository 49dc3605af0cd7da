"""Apply NewComputeBench's regex bitflip rules to any torch model (the reference's
``transform_model``), with the same matching and seeds as ``jaxflip.bitflip.apply_bitflip_rules``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from jaxflip.bitflip import BitflipConfig, RuleSet, RuleTable, match_rules
from jaxflip.torch_bridge.layers import RandomBitFlipLinear


def transform_model(model: torch.nn.Module, rules: Mapping | RuleSet | BitflipConfig | RuleTable,
                    seed_mode: str = "reference", base_seed: int = 0) -> RuleTable:
    """Replace, in place, every ``nn.Linear`` of ``model`` that ``rules`` flip by a
    ``RandomBitFlipLinear`` holding its weights; layers left alone stay as they are. Returns
    which layer got which rule (``match_rules``: full-match regexes, first wins, then
    ``default``; the LM head only when a pattern names it).

    ``seed_mode`` defaults to mase-triton's (``"reference"``: each layer starts from its rule's
    seeds, 0 unless given, so every layer of one rule flips the same positions), as
    ``apply_bitflip_rules`` does. A ``BitflipConfig`` brings its own seeds (independent
    per-layer ones with ``base_seed``): ``transform_model(model, read_bitflip_config(path))``
    flips as ``python -m jaxflip.eval --bitflip-config path`` does. A ``RuleTable`` already
    matched to these layer names (``BitflipConfig.match``) is applied as it is. The layers
    flip exactly, unless a ``BitflipConfig`` says ``exact=False``."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if isinstance(rules, RuleTable):
        table = rules
    elif isinstance(rules, BitflipConfig):
        table = rules.match(list(linears))
    else:
        table = match_rules(list(linears), rules, seed_mode, base_seed)
    for row in table:
        if row.flipped:
            layer = RandomBitFlipLinear.from_linear(linears[row.layer], exact=getattr(rules, "exact", True))
            layer.configure(row.x_flip, row.w_flip, row.seeds)
            model.set_submodule(row.layer, layer)
    return table
