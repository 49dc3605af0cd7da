"""From a config to what the step needs: the device mesh, the model (random, HF or jaxflip
weights; LoRA; bitflip rules; remat) and the tokenizer."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxflip.bitflip import BitflipSeed, LoRAParam, RuleTable, add_lora
from jaxflip.data.sources import BUILTIN_TOKENIZER, load_tokenizer
from jaxflip.models import LlamaForCausalLM, get_flavor, open_checkpoint
from jaxflip.models.create import create_random_llama
from jaxflip.models.sharding import make_mesh
from jaxflip.train.train_config import ConfigError, TrainConfig, check_positions


def initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` for multi-host runs: from the config's
    ``[parallelism]`` fields when set, else from the environment JAX understands (SLURM,
    ``JAX_COORDINATOR_ADDRESS``...). A single-host run with neither does nothing.

    With several processes, ``checkpoint.export_model`` is refused at once rather than hanging
    at the end: ``jaxflip.models.save`` stages into a temporary folder of its own per process,
    and Orbax then waits forever for the other processes to write the same folder."""
    p = config.parallelism
    if p.coordinator_address:
        jax.distributed.initialize(coordinator_address=p.coordinator_address,
                                   num_processes=p.num_processes or None,
                                   process_id=None if p.process_id < 0 else p.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()
    if jax.process_count() > 1 and config.checkpoint.export_model:
        raise ConfigError(f"checkpoint.export_model: not supported with {jax.process_count()} processes yet; set "
                          f"it false (a one-process run of the same output_dir resumes the last checkpoint and "
                          f"exports it)")


def mesh_degrees(config: TrainConfig, devices: int) -> tuple[int, int]:
    """``(dp, fsdp)`` as the config asks for them on ``devices`` devices (``fsdp_degree`` -1:
    every device ``data_parallel_replicate_degree`` leaves)."""
    p = config.parallelism
    dp = p.data_parallel_replicate_degree
    return dp, p.fsdp_degree if p.fsdp_degree != -1 else devices // dp


def mesh_mismatch(config: TrainConfig, devices: int) -> str | None:
    """Why the config's mesh does not cover exactly ``devices`` devices, with the flags that
    make it do so, or None when it does (a run must use every visible device, as torchrun's
    world size must match the reference's mesh)."""
    dp, fsdp = mesh_degrees(config, devices)
    if dp * fsdp == devices:
        return None
    fix = "--parallelism.fsdp_degree -1" + ("" if devices % dp == 0 else " --parallelism.data_parallel_replicate_degree 1")
    return (f"parallelism.fsdp_degree: {fsdp} x data_parallel_replicate_degree {dp} = {dp * fsdp} devices, but "
            f"{devices} are visible ({jax.devices()[0].platform}); pass {fix} to use {'it' if devices == 1 else 'all'}")


def build_mesh(config: TrainConfig) -> Mesh:
    """A ``(dp, fsdp)`` mesh over every visible device; a config that does not cover exactly
    those devices is an error that names the flag to pass."""
    devices = jax.device_count()
    if (mismatch := mesh_mismatch(config, devices)) is not None:
        raise ConfigError(mismatch)
    dp, fsdp = mesh_degrees(config, devices)
    return make_mesh(dp=dp, fsdp=fsdp)


def check_mesh_fits(model_config, mesh: Mesh) -> None:
    """FSDP splits every weight along the model dimension: one that does not divide over the
    ``fsdp`` axis would silently stay whole on every device."""
    fsdp = mesh.shape["fsdp"]
    if model_config.hidden_size % fsdp:
        raise ConfigError(f"parallelism.fsdp_degree: {fsdp} does not divide the model's hidden_size "
                          f"{model_config.hidden_size}; use a divisor (or data_parallel_replicate_degree)")


def tokenizer_source(config: TrainConfig, model_tokenizer_dir) -> str:
    """``data.tokenizer`` if set, else the tokenizer that came with the weights, else the built-in one."""
    if config.data.tokenizer:
        return config.data.tokenizer
    if model_tokenizer_dir is not None:
        return str(model_tokenizer_dir)
    if config.model.hf_model_path:
        return config.model.hf_model_path
    return BUILTIN_TOKENIZER


def build_model(config: TrainConfig, mesh: Mesh):
    """The sharded model, ready to train, and the tokenizer folder its weights came with.

    Trained weights are float32 (the optimizer's master copy); frozen ones (LoRA's base) are
    stored in ``training.dtype``; the forward runs in ``training.mixed_precision_param``."""
    t, m = config.training, config.model
    lora = config.lora.r > 0
    stored = t.dtype if lora else "float32"
    tokenizer_dir = None
    if m.hf_model_path or m.checkpoint:
        model, tokenizer_dir = open_checkpoint(m.hf_model_path or m.checkpoint, mesh=mesh, param_dtype=stored,
                                               dtype=t.mixed_precision_param)
        check_mesh_fits(model.config, mesh)
        check_positions(t.seq_len, model.config.max_position_embeddings, m.hf_model_path or m.checkpoint)
    else:
        changes = {"param_dtype": stored, "dtype": t.mixed_precision_param}
        if m.vocab_size:
            changes["vocab_size"] = m.vocab_size
        model_config = get_flavor(config.flavor, **changes)
        check_mesh_fits(model_config, mesh)
        model = create_random_llama(model_config, mesh, config.job.seed)
    if lora:
        add_lora(model, rank=config.lora.r, alpha=config.lora.lora_alpha, rngs=nnx.Rngs(config.job.seed + 1))
        for _, variable in nnx.to_flat_state(nnx.state(model, LoRAParam)):
            variable.set_value(variable.get_value().astype(jnp.float32))
    model.model.set_remat(m.remat)
    return model, tokenizer_dir


def abstract_model(config: TrainConfig, mesh: Mesh) -> LlamaForCausalLM:
    """What training builds (``build_model``: LoRA, remat, then the bitflip rules), as shapes
    only (``nnx.eval_shape``: nothing is allocated but the seeds). The rules are applied
    outside the trace: under it, every seed written (jax 0.10) prints the whole trace so far
    into an error message never raised, minutes for a 1B model."""
    model = nnx.eval_shape(lambda: build_model(config, mesh)[0])
    for _, seed in nnx.to_flat_state(nnx.state(model, BitflipSeed)):
        seed.set_value(jnp.zeros(seed.shape, seed.dtype))
    apply_bitflip(config, model)
    return model


def apply_bitflip(config: TrainConfig, model: LlamaForCausalLM) -> RuleTable | None:
    """Configure the model's flips from ``[bitflip]``; returns the rule table (None when off)."""
    return config.bitflip.apply(model) if config.bitflip.enable else None


def load_config_tokenizer(config: TrainConfig, model_tokenizer_dir, model: LlamaForCausalLM):
    tokenizer = load_tokenizer(tokenizer_source(config, model_tokenizer_dir))
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary of "
                          f"{model.config.vocab_size} (set model.vocab_size)")
    return tokenizer
