"""A model's parameters by name: the HF-style keys (``model.layers.0.mlp.up_proj.weight``,
LoRA factors ``...lora_A``/``lora_B``) that every checkpoint format reads and writes, the set a
config (and its LoRA adapters) expects, and the checks a reader runs against that set before
it reads a weight."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxflip.bitflip import add_lora, named_linears
from jaxflip.models.llama import LlamaForCausalLM
from jaxflip.models.llama_config import LlamaConfig

LORA_FACTORS = ("lora_A", "lora_B")  # name endings of a LoRA adapter's parameters


def param_state(model: nnx.Module) -> nnx.State:
    """Every parameter (``nnx.Param``, LoRA factors included), not the bitflip seeds."""
    return nnx.state(model, nnx.Param)


def flat_params(state: nnx.State) -> dict:
    """``{"model.layers.0.mlp.up_proj.weight": value}``: HF-style names, the checkpoint's keys."""
    return {".".join(str(part) for part in path): variable.get_value()
            for path, variable in nnx.to_flat_state(state)}


def abstract_model(config: LlamaConfig, lora: dict | None = None) -> LlamaForCausalLM:
    """The model (with LoRA adapters on ``lora["layers"]``) as shapes only: nothing allocated."""

    def build():
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        if lora:
            add_lora(model, rank=lora["rank"], alpha=lora["alpha"], rngs=nnx.Rngs(0),
                     skip=tuple(set(named_linears(model)) - set(lora["layers"])))
        return model

    return nnx.eval_shape(build)


def expected_params(config: LlamaConfig, lora: dict | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Name -> shape and dtype of every parameter a checkpoint of this model holds."""
    return flat_params(param_state(abstract_model(config, lora)))


def short_list(names, limit: int = 4) -> str:
    """``a, b, c, d (+5 more)``: keeps an error message on one readable line."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_params(source, shapes: dict[str, tuple], expected: dict[str, jax.ShapeDtypeStruct]) -> None:
    """Raise ``ValueError`` unless ``shapes`` (name -> shape) has exactly the expected names
    and shapes."""
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing or unexpected:
        problems = ([f"missing {short_list(missing)}"] if missing else []) + (
            [f"unexpected {short_list(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source}: tensors do not fit the config: {'; '.join(problems)}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(shape)}, the config expects {tuple(expected[name].shape)}")


def check_floating(source, dtypes: dict) -> None:
    """Raise ``ValueError`` when parameters (name -> dtype) are not floating point: an integer
    or boolean tensor cast to the model's float dtype would load silently as something else."""
    bad = sorted(name for name, dtype in dtypes.items() if not jax.numpy.issubdtype(dtype, jax.numpy.floating))
    if bad:
        raise ValueError(f"{source}: {short_list(bad)} hold {np.dtype(dtypes[bad[0]]).name} values, not floating point; "
                         f"weights are not cast from integers")
