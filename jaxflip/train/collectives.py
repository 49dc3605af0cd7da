"""What a compiled step moves between devices: the collectives of its optimized HLO.

An FSDP step should gather each weight (forward, and again in the backward unless kept) and
reduce-scatter its gradient: about 3x the parameter bytes. Anything far above that is XLA
guessing a layout (activations or logits gathered, flips run on gathered tensors), which is
what ``collective_bytes`` makes visible without a GPU.
"""

from __future__ import annotations

import re
from collections import Counter

from jaxflip.train.program_stats import type_bytes

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# `%name = TYPE op(` where TYPE is one shape or a tuple of shapes; async pairs count at their start
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_bytes(hlo_text: str) -> Counter:
    """Bytes produced by each kind of collective in ``hlo_text`` (``compiled.as_text()``),
    per device. An async ``*-start`` whose result tuple also holds its operand counts both
    (an upper bound: the check it serves is one of orders of magnitude)."""
    moved = Counter()
    for match in _INSTRUCTION.finditer(hlo_text):
        moved[match.group("op")] += type_bytes(match.group("type"))
    return moved
