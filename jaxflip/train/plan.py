"""A training config's memory per device, before any GPU is rented (``--plan``).

    python -m jaxflip.train --config configs/llama3-70b-lora.toml --plan 2x141,4x80,8x80

For each scenario (N GPUs of G GB each) the plan gives, per device:

* **state** (exact): the trained parameters, the frozen ones (LoRA's base), the optimizer
  state and the seeds, each leaf's per-device shard of the train state that training builds
  (``jax.eval_shape`` of the model, LoRA, bitflip rules, scanned layers and ``tx.init``; the
  shardings of ``step.state_sharding`` on an abstract ``(dp, fsdp)`` mesh of N devices).
  Nothing is allocated: the 70B plan runs on a laptop.
* **gradients**: the step's float32 accumulator and one micro-batch's gradient, both shaped
  and sharded like the trained parameters (2x their shard in ``mixed_precision_reduce``).
* **activations** (a formula, below), linear in the micro-batch (``local_batch_size`` rows per
  device), plus what a step holds whatever the batch (gathered weights of one layer and the LM
  head).

The activation formula, per device, ``n = local_batch_size * seq_len`` tokens, compute dtype of
``c`` bytes, ``L`` decoder layers:

* ``remat = "full"``: the scan keeps each layer's input, ``L * n * d * c``; the backward
  recomputes one layer at a time, so the peak adds one layer's live set (below, x2 for its
  gradients) or the LM head's (the logits in the compute dtype and one float32 copy that the
  log-softmax and its gradient share: ``n * V * (c + 4)``), whichever is larger. ``remat = "none"``: every layer's live set is
  kept (``L`` of them); ``"dots"``: the matmul outputs of each layer are kept, the rest
  recomputed.
* One layer's live set per token: the residual, the two norms' outputs and float32 inputs,
  each Linear's output (and, when its input flips, the flipped copy plus the int8 keep mask
  the backward reuses; an input whose every reader flips it is not kept itself), RoPE'd q
  and k, the attention output, the MLP's sigmoid, activation and product. With
  XLA's attention (CPU, or float32 on GPU) the ``heads x seq_len`` scores per token (float32
  and the compute dtype) too; cuDNN's fused attention (GPU, bfloat16) keeps only its
  softmax statistics.
* Whatever the batch: one layer's weights gathered in the compute dtype twice (XLA gathers
  the next layer while the current one runs), their full-size gradient in the backward (a
  LoRA layer's merged weight gets one as well), each flipped weight's shard copy and keep
  mask; the LM head's weight gathered.

This is a compile-time estimate, checked against XLA's own memory analysis of the compiled
step (``benchmarks/aot_compile.py``; see benchmarks/NOTES.md), not a measured peak. The usable
memory of a GPU is ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default 0.75) of its size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from jaxflip.bitflip import BitFlipLinear, named_linears
from jaxflip.models.scan import stack_layers
from jaxflip.models.sharding import MESH_AXES, make_mesh
from jaxflip.train import setup
from jaxflip.train.train_config import ConfigError, TrainConfig
from jaxflip.train.step import TrainState, abstract_train_state, make_optimizer, split_model, state_sharding

DEFAULT_SCENARIOS = "2x141,4x80,8x80"
JAX_DEFAULT_MEM_FRACTION = 0.75
_SCENARIO = re.compile(r"(\d+)x(\d+(?:\.\d+)?)")


@dataclasses.dataclass(frozen=True)
class Scenario:
    gpus: int
    gb: float  # memory per GPU as vendors state it, 1e9 bytes (H100: 80, H200: 141)

    @classmethod
    def parse_list(cls, text: str) -> list[Scenario]:
        """``"2x141,4x80"`` -> two scenarios; a ConfigError naming the bad entry otherwise."""
        scenarios = []
        for entry in text.split(","):
            match = _SCENARIO.fullmatch(entry.strip())
            if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
                raise ConfigError(f"--plan: expected GPUSxGB entries such as 2x141,4x80, got {entry!r}")
            scenarios.append(cls(int(match.group(1)), float(match.group(2))))
        return scenarios


@dataclasses.dataclass(frozen=True)
class AbstractTraining:
    """What training builds for a config, as shapes: the train state, the optimizer, and the
    model's shape facts the activation formula needs."""

    state: TrainState
    tx: object
    model_config: object
    layer_linears: dict  # name within a decoder layer -> BitFlipLinear (abstract)
    lm_head: BitFlipLinear | None
    layer_params: int  # parameters of one decoder layer (base and adapters)


def abstract_training(config: TrainConfig) -> AbstractTraining:
    """The model as ``setup.build_model`` and ``apply_bitflip`` make it, with random-init
    shapes (the flavor's; ``hf_model_path`` is not read), layers stacked as training stacks
    them, and the train state's shapes. Built on a one-device mesh: shapes do not depend on it."""
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, hf_model_path="", checkpoint=""))
    model = setup.abstract_model(config, make_mesh(dp=1, fsdp=1, devices=jax.devices()[:1]))
    linears = named_linears(model)
    prefix = "model.layers.0."
    layer_linears = {name[len(prefix):]: linear for name, linear in linears.items() if name.startswith(prefix)}
    layer_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model.model.layers[0], nnx.Param)))
    stack_layers(model)
    graphdef, trainable, frozen, seeds = split_model(model, config.lora.r > 0)
    tx = make_optimizer(config.training)
    return AbstractTraining(abstract_train_state(tx, trainable, frozen, seeds), tx, model.config, layer_linears,
                            linears.get("lm_head"), layer_params)


def state_bytes_per_device(training: AbstractTraining, mesh: AbstractMesh) -> dict[str, int]:
    """Each part of the train state: the bytes of one device's shard (the largest, where a
    dimension splits unevenly)."""
    shardings = state_sharding(mesh, training.tx, training.state)

    def shard_bytes(tree, sharding_tree) -> int:
        return sum(math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                   for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(sharding_tree), strict=True))

    return {"trainable": shard_bytes(training.state.trainable, shardings.trainable),
            "frozen": shard_bytes(training.state.frozen, shardings.frozen),
            "optimizer": shard_bytes(training.state.opt_state, shardings.opt_state),
            "seeds": shard_bytes(training.state.seeds, shardings.seeds) + 4}


def _flips(linear: BitFlipLinear) -> tuple[bool, bool]:
    """Whether the compiled step flips (or zeroes out) the input and the weight: their arming."""
    return linear.x_armed.any, linear.w_armed.any


# the Linears of a decoder layer that share one input (a norm's output, the attention's, the MLP product)
_SHARED_INPUTS = {"self_attn.q_proj": "attention_in", "self_attn.k_proj": "attention_in",
                  "self_attn.v_proj": "attention_in", "self_attn.o_proj": "attention_out",
                  "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "mlp_product"}


def layer_live_bytes_per_token(training: AbstractTraining, config: TrainConfig, attention: str) -> float:
    """One decoder layer's forward tensors per token (see the module docstring)."""
    m = training.model_config
    c = np.dtype(config.training.mixed_precision_param).itemsize
    d, heads, mlp = m.hidden_size, m.num_attention_heads, m.intermediate_size
    q, kv = heads * m.head_dim, m.num_key_value_heads * m.head_dim
    # residual, 2 norm outputs; RoPE'd q, k; attention output; the MLP's sigmoid, activation, product
    total = (3 * d + (q + kv) + q + 3 * mlp) * c + 2 * d * 4  # + the norms' float32 inputs
    inputs: dict[str, list[bool]] = {}
    for name, linear in training.layer_linears.items():
        flips_x, _ = _flips(linear)
        total += linear.out_features * c + (linear.in_features * (c + 1) if flips_x else 0)
        inputs.setdefault(_SHARED_INPUTS.get(name, name), []).append(flips_x)
    # an input only flipped copies are made of is not kept itself
    sizes = {"attention_in": d, "attention_out": q, "mlp_in": d, "mlp_product": mlp}
    total -= sum(sizes.get(group, 0) * c for group, flipped in inputs.items() if all(flipped))
    if attention == "xla":
        total += heads * config.training.seq_len * (4 + c)
    else:
        total += heads * 4
    return total


def layer_saved_bytes_per_token(training: AbstractTraining, config: TrainConfig, attention: str) -> float:
    """What the backward keeps of each layer, per token, under the config's remat policy."""
    c = np.dtype(config.training.mixed_precision_param).itemsize
    remat = config.model.remat
    if remat == "full":
        return training.model_config.hidden_size * c
    if remat == "dots":
        return training.model_config.hidden_size * c + sum(
            linear.out_features * c for linear in training.layer_linears.values())
    return layer_live_bytes_per_token(training, config, attention)


def activation_bytes(training: AbstractTraining, config: TrainConfig, fsdp: int, attention: str) -> dict[str, float]:
    """``per_row``: bytes per micro-batch row on a device; ``fixed``: bytes a step holds
    whatever the batch (gathered weights, weight flips)."""
    m, t = training.model_config, config.training
    c = np.dtype(t.mixed_precision_param).itemsize
    layers = m.num_hidden_layers
    live = layer_live_bytes_per_token(training, config, attention)
    saved = layer_saved_bytes_per_token(training, config, attention)
    head = m.vocab_size * (c + 4)
    if training.lm_head is not None and training.lm_head.x_armed.any:
        head += m.hidden_size * (c + 1)
    per_token = layers * saved + max(2 * live, head)
    flipped_weights = sum(linear.in_features * linear.out_features
                          for linear in training.layer_linears.values() if _flips(linear)[1])
    fixed = (3 * training.layer_params * c  # the gathered layer, the next one, its full-size gradient
             + flipped_weights * (c + 1) / fsdp
             + m.vocab_size * m.hidden_size * c)  # the LM head (or tied embedding) gathered
    return {"per_row": per_token * t.seq_len, "fixed": fixed}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    scenario: Scenario
    mesh: dict
    attention: str
    local_batch_size: int
    state: dict  # per part, bytes per device
    gradients: int
    activations: float
    activations_per_row: float
    activations_fixed: float
    usable: float

    @property
    def total(self) -> float:
        return sum(self.state.values()) + self.gradients + self.activations_fixed + self.activations

    def summary(self) -> dict:
        """The figures in GiB, for scripts (``benchmarks/summarize_runs.py``)."""
        gib = 2**30
        return {"gpus": self.scenario.gpus, "gb": self.scenario.gb, "mesh": self.mesh, "attention": self.attention,
                "local_batch_size": self.local_batch_size,
                **{f"{part}_gib": value / gib for part, value in self.state.items()},
                "gradients_gib": self.gradients / gib, "activations_gib": (self.activations + self.activations_fixed) / gib,
                "total_gib": self.total / gib, "usable_gib": self.usable / gib, "max_local_batch": self.max_local_batch}

    @property
    def max_local_batch(self) -> int:
        free = self.usable - (self.total - self.activations)
        return max(int(free // self.activations_per_row), 0)


def scenario_mesh(config: TrainConfig, scenario: Scenario) -> tuple[dict, list[str]]:
    """The ``(dp, fsdp)`` mesh the config gets on ``scenario.gpus`` devices, and notes where the
    config's ``fsdp_degree`` must be overridden to run there."""
    p = config.parallelism
    dp, notes = p.data_parallel_replicate_degree, []
    if scenario.gpus % dp:
        raise ConfigError(f"--plan: {scenario.gpus} GPUs do not divide over data_parallel_replicate_degree {dp}")
    fsdp = scenario.gpus // dp
    if p.fsdp_degree not in (-1, fsdp):
        notes.append(f"{scenario.gpus} GPUs: run with --parallelism.fsdp_degree {fsdp} (the config says "
                     f"{p.fsdp_degree})")
    return {"dp": dp, "fsdp": fsdp}, notes


def gpu_attention(config: TrainConfig) -> str:
    """The attention a GPU runs for this config (``LlamaAttention._implementation``)."""
    return "cudnn" if config.training.mixed_precision_param == "bfloat16" else "xla"


def plan(config: TrainConfig, scenarios: list[Scenario], *, attention: str | None = None,
         mem_fraction: float | None = None, training: AbstractTraining | None = None) -> list[MemoryPlan]:
    """The memory plan of ``config`` on each scenario. ``attention``: ``cudnn`` or ``xla``
    (default: what a GPU runs, ``gpu_attention``). ``mem_fraction``: the usable share of each
    GPU (default: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or JAX's 0.75)."""
    attention = attention or gpu_attention(config)
    if mem_fraction is None:
        mem_fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_MEM_FRACTION))
    if training is None:
        # said first: building the state's shapes is the slow part (70B LoRA: a minute on 2 CPU cores)
        print(f"plan: building the train state of {config.flavor} as shapes (nothing is allocated)", file=sys.stderr,
              flush=True)
        training = abstract_training(config)
    t = config.training
    plans = []
    for scenario in scenarios:
        mesh_shape, _ = scenario_mesh(config, scenario)
        mesh = AbstractMesh(tuple(mesh_shape.values()), MESH_AXES)
        setup.check_mesh_fits(training.model_config, mesh)
        state = state_bytes_per_device(training, mesh)
        reduce = np.dtype(t.mixed_precision_reduce).itemsize
        gradients = 2 * state["trainable"] * reduce // np.dtype(np.float32).itemsize
        acts = activation_bytes(training, config, mesh_shape["fsdp"], attention)
        plans.append(MemoryPlan(scenario, mesh_shape, attention, t.local_batch_size, state, gradients,
                                acts["per_row"] * t.local_batch_size, acts["per_row"], acts["fixed"],
                                scenario.gb * 1e9 * mem_fraction))
    return plans


def format_plan(config: TrainConfig, plans: list[MemoryPlan]) -> str:
    gib = 2**30
    lines = [f"memory plan per device: {config.flavor}, "
             f"{'LoRA r ' + str(config.lora.r) if config.lora.r else 'full training'}, "
             f"remat {config.model.remat}, bitflip {'on' if config.bitflip.enable else 'off'}, "
             f"micro-batch {config.training.local_batch_size} x {config.training.seq_len} per device, "
             f"{plans[0].attention} attention (GiB; a compile-time estimate, not a measured peak)",
             f"{'GPUs':>8} {'mesh':>11} {'trained':>8} {'frozen':>8} {'optim':>7} {'grads':>7} {'act':>7} "
             f"{'total':>7} {'usable':>7}  fits  max micro-batch"]
    notes = []
    for p in plans:
        s = p.state
        lines.append(f"{p.scenario.gpus:>3}x{p.scenario.gb:<4g} {'dp' + str(p.mesh['dp']) + ' fsdp' + str(p.mesh['fsdp']):>11} "
                     f"{s['trainable'] / gib:8.2f} {s['frozen'] / gib:8.2f} {s['optimizer'] / gib:7.2f} "
                     f"{p.gradients / gib:7.2f} {(p.activations + p.activations_fixed) / gib:7.2f} "
                     f"{p.total / gib:7.2f} {p.usable / gib:7.2f}  {'yes' if p.total <= p.usable else 'NO ':>4}  "
                     f"{p.max_local_batch}")
        notes += scenario_mesh(config, p.scenario)[1]
    per_row = plans[0].activations_per_row / gib if plans else 0
    lines.append(f"activations: {per_row:.2f} GiB per micro-batch row per device, plus "
                 f"{plans[0].activations_fixed / gib:.2f} GiB whatever the batch" if plans else "")
    lines.append(f"usable: XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU "
                 f"({os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_DEFAULT_MEM_FRACTION)})")
    return "\n".join(lines + notes)
