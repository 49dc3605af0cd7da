"""The train state and one optimizer step, as pure functions of explicit state.

The model is split once into its graph (static) and four states: ``trainable`` (every
``nnx.Param``, or only the ``LoRAParam`` factors), ``frozen`` (the rest of the weights),
``seeds`` (the ``BitflipSeed`` of every flipped tensor) and the optax state. When every
decoder layer has the same graph, the state holds the layers stacked along a leading layer axis
and the forward scans them (``jaxflip.models.scan``): compile time then does not grow with
depth. The step merges them into a model, runs ``gradient_accumulation_steps`` micro-batches
under ``lax.scan`` (the seeds advancing through each), clips, updates, and returns the new
state. Shardings are declared once: parameters by their logical axes
(``jaxflip.models.sharding``), optimizer moments like the parameters they follow, seeds and
counters replicated, the batch over every data axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxflip.bitflip import BitflipSeed, LoRAParam
from jaxflip.models.flavors import param_count
from jaxflip.models.scan import stack_layers
from jaxflip.models.sharding import OnMesh, logical_to_spec, state_shardings
from jaxflip.train.train_config import TrainingConfig


class TrainState(NamedTuple):
    step: jax.Array  # int32: optimizer steps taken
    trainable: nnx.State
    frozen: nnx.State
    seeds: nnx.State
    opt_state: optax.OptState


def learning_rate_schedule(t: TrainingConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine / linear decay to ``min_lr_ratio * lr`` at
    ``steps`` (or constant)."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    end = t.lr * t.min_lr_ratio
    decay = {
        "cosine": optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.min_lr_ratio),
        "linear": optax.linear_schedule(t.lr, end, decay_steps),
        "constant": optax.constant_schedule(t.lr),
    }[t.decay]
    if t.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), decay], [t.warmup_steps])


def make_optimizer(t: TrainingConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.max_norm), adamw) if t.max_norm > 0 else adamw


def split_model(model: nnx.Module, lora: bool):
    """``(graphdef, trainable, frozen, seeds)``."""
    trainable_filter = LoRAParam if lora else nnx.Param
    graphdef, trainable, seeds, frozen = nnx.split(model, trainable_filter, BitflipSeed, ...)
    return graphdef, trainable, frozen, seeds


def merge_model(graphdef, trainable, frozen, seeds) -> nnx.Module:
    """A model over fresh Variables (``jax.tree.map`` rebuilds them at the current trace level,
    so the forward may advance the seeds inside ``jit`` / ``scan``)."""
    fresh = jax.tree.map(lambda x: x, (trainable, seeds, frozen))
    return nnx.merge(graphdef, *fresh)


def state_sharding(mesh: Mesh, tx: optax.GradientTransformation, abstract: TrainState) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = state_shardings(abstract.trainable, mesh)
    # optax state: moments shaped like the trainable parameters follow their sharding
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract.opt_state, trainable,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, trainable=trainable, frozen=state_shardings(abstract.frozen, mesh),
                      seeds=jax.tree.map(lambda _: replicated, abstract.seeds), opt_state=opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batches ``(accumulation, batch, seq_len + 1)``: rows over every data axis."""
    spec = logical_to_spec((None, "batch", "length"), mesh)
    return NamedSharding(mesh, spec)


def abstract_train_state(tx: optax.GradientTransformation, trainable, frozen, seeds) -> TrainState:
    """The train state's shapes: the optimizer state as ``tx.init`` would create it."""
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, frozen, seeds, jax.eval_shape(tx.init, trainable))


def init_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, lora: bool, *,
               scan_layers: bool = True):
    """``(graphdef, state, shardings, scanned)`` with the optimizer state created sharded.

    The train state takes over the model's weights: with ``scan_layers``, if every decoder
    layer has the same graph (the same flip arming), ``model.model.layers`` is replaced by
    its stacked form in place (``scanned`` is True; see ``jaxflip.models.scan``), else the
    layers stay a list and the step loops over them (``scanned`` is False)."""
    scanned = scan_layers and stack_layers(model)
    graphdef, trainable, frozen, seeds = split_model(model, lora)
    shardings = state_sharding(mesh, tx, abstract_train_state(tx, trainable, frozen, seeds))
    # LoRA's factors are made whole on one device (add_lora): placed in their shards now, not at the first step
    trainable = jax.device_put(trainable, shardings.trainable)
    # the frozen state (flip settings, LoRA's base weights) too: left where it was made, the step
    # would compile twice, first for it as made, then as the step hands it back
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    step = jax.device_put(jnp.int32(0), shardings.step)
    seeds = jax.device_put(seeds, shardings.seeds)
    return graphdef, TrainState(step, trainable, frozen, seeds, opt_state), shardings, scanned


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean token cross-entropy, in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def forward_loss(graphdef, compute: jnp.dtype, trainable, frozen, seeds, tokens: jax.Array):
    """``(loss, seeds after the forward)``: the mean next-token cross-entropy of ``tokens``
    ``(batch, seq_len + 1)``, the one forward of training and of validation. The forward sees
    the ``compute`` dtype; gradients flow back to the float32 master weights."""
    cast = jax.tree.map(lambda w: w.astype(compute) if jnp.issubdtype(w.dtype, jnp.floating) else w, trainable)
    model = merge_model(graphdef, cast, frozen, seeds)
    loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return loss, nnx.state(model, BitflipSeed)


def make_train_step(graphdef, tx: optax.GradientTransformation, t: TrainingConfig, shardings: TrainState,
                    batch_shard: NamedSharding):
    """``step(state, batch) -> (state, metrics)``, jitted, the state donated. ``batch``:
    int32 ``(gradient_accumulation_steps, global_batch, seq_len + 1)``. Traced and run on the
    batch's mesh (``OnMesh``): activations constrained, each device flipping its own shards.
    With ``t.skip_nonfinite``, a step whose loss or gradient norm is not finite applies no update."""
    compute = jnp.dtype(t.mixed_precision_param)
    reduce = jnp.dtype(t.mixed_precision_reduce)
    grad_fn = jax.value_and_grad(functools.partial(forward_loss, graphdef, compute), has_aux=True)

    def step(state: TrainState, batch: jax.Array):
        def micro_step(carry, tokens):
            grad_sum, loss_sum, seeds = carry
            (loss, seeds), grads = grad_fn(state.trainable, state.frozen, seeds, tokens)
            grad_sum = jax.tree.map(lambda total, g: total + g.astype(reduce), grad_sum, grads)
            return (grad_sum, loss_sum + loss, seeds), None

        zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, reduce), state.trainable)
        (grad_sum, loss_sum, seeds), _ = jax.lax.scan(micro_step, (zeros, jnp.float32(0), state.seeds), batch)
        accumulation = batch.shape[0]
        grads = jax.tree.map(lambda g, w: (g / accumulation).astype(w.dtype), grad_sum, state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / accumulation, "grad_norm": optax.tree.norm(grads)}
        if t.skip_nonfinite:
            # a non-finite loss or gradient applies no update: the weights, the optimizer state and
            # both step counts stay (the loop counts skipped steps as its step minus state.step).
            # The seeds advance all the same: the next step draws new flips (the same flips could
            # make the same overflow again), and the flips of every later step are those of a run
            # that did not skip
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

            def if_finite(updated, kept):
                return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)

            return TrainState(if_finite(state.step + 1, state.step), if_finite(trainable, state.trainable),
                              state.frozen, seeds, if_finite(opt_state, state.opt_state)), metrics
        return TrainState(state.step + 1, trainable, state.frozen, seeds, opt_state), metrics

    jitted = jax.jit(step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, None), donate_argnums=0)
    return OnMesh(jitted, batch_shard.mesh)


def make_eval_step(graphdef, t: TrainingConfig, shardings: TrainState, batch_shard: NamedSharding):
    """``evaluate(state, batches) -> mean loss`` over int32 ``(n, global_batch, seq_len + 1)``
    batches, jitted (compiled at its first call only), the state left as it is: the flips run
    from the state's seeds, which advance through the batches and are then dropped, so
    validation changes nothing training does next."""
    compute = jnp.dtype(t.mixed_precision_param)

    def evaluate(state: TrainState, batches: jax.Array) -> jax.Array:
        def batch_loss(seeds, tokens):
            loss, seeds = forward_loss(graphdef, compute, state.trainable, state.frozen, seeds, tokens)
            return seeds, loss

        _, losses = jax.lax.scan(batch_loss, state.seeds, batches)
        return losses.mean()

    jitted = jax.jit(evaluate, in_shardings=(shardings, batch_shard))
    return OnMesh(jitted, batch_shard.mesh)


def trainable_param_count(state: TrainState) -> int:
    return sum(x.size for x in jax.tree.leaves(state.trainable))


def flops_per_token(model_config, seq_len: int, lora: bool) -> float:
    """Matmul FLOPs per trained token (PaLM's estimate): 6 N for the weights (forward 2 N,
    backward 4 N; with LoRA the frozen weights get no gradient: 4 N) plus attention's
    12 L d T. N counts every Linear weight (LM head included, embedding lookup excluded)."""
    n = param_count(model_config, exclude_embedding=True)
    if model_config.tie_word_embeddings:
        n += model_config.vocab_size * model_config.hidden_size
    attention = 12 * model_config.num_hidden_layers * model_config.num_attention_heads * model_config.head_dim * seq_len
    return (4 if lora else 6) * n + attention


# dense bf16 peak FLOP/s by jax device_kind prefix, for MFU
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA B200": 2250e12, "NVIDIA A100": 312e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}


def peak_flops(device: jax.Device) -> float | None:
    return next((flops for prefix, flops in PEAK_FLOPS.items() if device.device_kind.startswith(prefix)), None)
