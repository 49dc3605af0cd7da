"""What a step's program holds, read from its text: the ops of the optimized HLO by kind (copies
and their bytes, where scan carries and flipped tensors may be copied; the bitflip kernel's
custom-calls), and how many times an
op of the jaxpr runs (a scan body's ops times its length), e.g. the bitflip kernel.

HLO is read from ``compiled.as_text()``; the shapes' bytes are those of the instruction's
result (a tuple counts every element)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
# `%name = TYPE opcode(...)`: TYPE one shape (with layout) or a tuple of shapes (see _split_type)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s*(?P<op>[a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
# computations an instruction runs as its own body (their instructions are the fusion's, a
# reduction's...): only those of the entry, loops, conditionals and calls are counted as ops
_INNER_CALLS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_LOOP_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
# the Pallas kernel's name (kernels_pallas.kernel): on GPU a Triton custom-call carrying it
FLIP_KERNEL_NAME = "jaxflip_random_bitflip"


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: ``bf16[8,128]{1,0}``, or the sum over a tuple's shapes."""
    total = 0
    for dtype, dims in _SHAPE.findall(hlo_type):
        if dtype in _BYTES:
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _split_type(rest: str) -> tuple[str, str] | None:
    """``(type, opcode)`` of an instruction's text after ``=``: a tuple type is read to its
    matching parenthesis (it may hold nested tuples and ``/*index=5*/`` comments)."""
    if rest.startswith("("):
        depth = 0
        for end, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        hlo_type, after = rest[:end + 1], rest[end + 1:]
    else:
        hlo_type, _, after = rest.partition(" ")
        after = " " + after
    opcode = _OPCODE.match(after)
    return None if opcode is None else (hlo_type, opcode.group("op"))


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name (the entry under "ENTRY")."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            current = "ENTRY" if header.group("entry") else header.group("name")
            computations[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations


def _instructions(hlo_text: str):
    """``(computation, name, type, opcode)`` of every instruction of the computations that run
    as their own programs (the entry, loop bodies and conditions, branches), not of those run
    inside one instruction (fusions' and reductions' bodies)."""
    computations = _computations(hlo_text)
    inner = {name for lines in computations.values() for line in lines for name in _INNER_CALLS.findall(line)
             if " fusion(" in line or "to_apply=" in line}
    for computation, lines in computations.items():
        if computation in inner:
            continue
        for line in lines:
            match = _INSTRUCTION.match(line)
            parsed = None if match is None else _split_type(match.group("rest"))
            if parsed is not None:
                yield computation, match.group("name"), *parsed


def instruction_opcodes(hlo_text: str) -> dict[str, str]:
    """Each instruction's opcode by its name (a profile's CPU events carry these names)."""
    return {name: op for _, name, _, op in _instructions(hlo_text)}


def hlo_op_summary(hlo_text: str, top_copies: int = 8) -> dict:
    """The optimized HLO's ops, counted once where they are written (a loop body's once, not
    per iteration), outside fused and reducer computations: ``ops`` by opcode; ``copy_bytes``
    (all copies' results) and ``loop_copy_bytes`` (those in while bodies: a scan's carries
    and stacked outputs copied every iteration), and the largest copies (computation, bytes,
    type)."""
    loop_bodies = set(_LOOP_BODY.findall(hlo_text))
    ops, copies = Counter(), []
    for computation, _, hlo_type, op in _instructions(hlo_text):
        ops[op] += 1
        if op in ("copy", "copy-start"):
            copies.append((computation, type_bytes(hlo_type), hlo_type.split("{")[0]))
    copies.sort(key=lambda c: -c[1])
    return {"ops": dict(ops.most_common()), "copy_bytes": sum(c[1] for c in copies),
            "loop_copy_bytes": sum(c[1] for c in copies if c[0] in loop_bodies),
            "largest_copies": [{"computation": c[0], "bytes": c[1], "type": c[2],
                                "in_loop_body": c[0] in loop_bodies} for c in copies[:top_copies]]}


def flip_kernel_count(hlo_text: str) -> int:
    """Custom-calls of the bitflip kernel in the optimized HLO (where they are written: a scan
    body's once). 0 where the flips are plain XLA ops (the jnp backend, CPU's default)."""
    return sum(1 for line in hlo_text.splitlines() if "custom-call(" in line and FLIP_KERNEL_NAME in line)


def executed_count(jaxpr, primitive: str, **params) -> int:
    """How many times ``primitive`` (with these ``params``, if given) runs when ``jaxpr`` runs:
    equations in nested jaxprs (jit, remat, custom rules), those in a scan body times its length."""
    from jax.extend.core import jaxprs_in_params

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive and all(eqn.params.get(k) == v for k, v in params.items()):
            total += 1
            continue
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += repeat * sum(executed_count(sub, primitive, **params) for sub in jaxprs_in_params(eqn.params))
    return total
