"""Training's scanned decoder stack: compile time that does not grow with depth.

A Python loop over the decoder layers puts every layer's ops in the compiled program, so a
step's compile time grows with the layer count (80 layers for Llama-70B). Here the layers'
Variables are stacked along a leading layer axis and the forward is a ``lax.scan`` of one
layer's graph over them: XLA compiles one layer, whatever the depth.

The public model keeps ``model.model.layers`` an ``nnx.List`` of ``LlamaDecoderLayer`` with
HF names, which bitflip rules, the converters, checkpoints, LoRA and eval rely on. Only the
train state holds the stacked layout: ``stack_layers`` swaps the list for a ``StackedLayers``
when the train state is built, ``unstack_layers`` swaps it back for export. Both move one
leaf at a time and drop the source arrays as they go, so memory peaks at the parameters plus
one stacked leaf, not twice the parameters.

A scan runs the same graph for every layer, so every layer's graphdef must be identical. A
``BitFlipLinear``'s arming (``Armed``: whether its input and weight flip and zero out at all)
is static: rules that arm some layers differently from others (skip a layer) make the graphs
differ, and ``stack_layers`` then leaves the list (the Python loop runs). The flip settings
(halves, thresholds) and the seeds are state and stack like the weights: layer i flips with
its own settings, seeds and element indices, exactly what the loop flips, and the scan carries
each layer's advanced seeds back out.

A stacked Variable's ``out_sharding`` gains a leading ``None`` (the layer axis is replicated;
each layer's own axes shard as before); inside the scan body each layer's Variables carry the
per-layer axes again, so code that reads them sees what the loop sees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxflip.bitflip import BitflipSeed
from jaxflip.models.llama import REMAT_POLICIES


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _with_axes(variable: nnx.Variable, value, axes) -> nnx.Variable:
    """A Variable of ``variable``'s type and metadata holding ``value``, with ``out_sharding``
    set to ``axes`` when ``variable`` has logical axes."""
    metadata = variable.get_metadata()
    if metadata.get("out_sharding") is not None:
        metadata = metadata | {"out_sharding": axes}
    return type(variable)(value, **metadata)


def _stacked_axes(variable: nnx.Variable):
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else (None, *axes)


def _layer_axes(variable: nnx.Variable):
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes[1:])


class StackedLayers(nnx.Module):
    """``count`` identical decoder layers as one layer module whose Variables hold
    ``(count, ...)`` arrays; calling it scans the layer over them."""

    def __init__(self, layer: nnx.Module, count: int):
        self.layer = layer
        self.count = count

    def __call__(self, x: jax.Array, positions: jax.Array, remat: str) -> jax.Array:
        """The decoder stack on x (B, T, D) without a KV cache (training). ``remat``: the
        ``LlamaModel.set_remat`` policy, applied to each layer inside the scan body as the loop
        applies it to each layer."""
        graphdef, stacked = nnx.split(self.layer)

        def apply_layer(x, layer_state):
            layer_state = jax.tree.map(lambda v: _with_axes(v, v.get_value(), _layer_axes(v)), layer_state,
                                       is_leaf=_is_variable)
            layer = nnx.merge(graphdef, layer_state)
            x, _ = layer(x, positions, None)
            return x, nnx.state(layer, BitflipSeed)

        if remat != "none":
            # prevent_cse=False: inside a scan, rematerialization cannot be CSE'd away (jax's advice)
            apply_layer = jax.checkpoint(apply_layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
        x, seeds = jax.lax.scan(apply_layer, x, stacked)
        seeds = jax.tree.map(lambda v: _with_axes(v, v.get_value(), _stacked_axes(v)), seeds, is_leaf=_is_variable)
        nnx.update(self.layer, seeds)
        return x


def layers_are_identical(layers) -> bool:
    """Whether every layer has the same graph (structure, static attributes, flip arming)."""
    graphdefs = [nnx.graphdef(layer) for layer in layers]
    return all(graphdef == graphdefs[0] for graphdef in graphdefs[1:])


def _stacked_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return None


def _layer_sharding(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return None


@functools.lru_cache
def _stack(sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


@functools.lru_cache
def _split(count: int, sharding):
    return jax.jit(lambda x: [x[i] for i in range(count)], out_shardings=sharding)


def stack_layers(model: nnx.Module) -> bool:
    """Replace ``model.model.layers`` (an ``nnx.List`` of decoder layers) by a
    ``StackedLayers`` when every layer's graph is identical; returns whether it did. The
    stacked arrays keep each layer's sharding, with the layer axis replicated. Each per-layer
    array is dropped once stacked: keep no other reference to the layers to free them."""
    layers = model.model.layers
    if not layers or not layers_are_identical(layers):
        return False
    graphdef = nnx.graphdef(layers[0])
    per_layer = [nnx.to_flat_state(nnx.state(layer)) for layer in layers]
    paths = [path for path, _ in per_layer[0]]
    per_layer = [[variable for _, variable in flat] for flat in per_layer]
    model.model.layers = None  # the layer modules go; only per_layer holds their Variables now
    del layers
    stacked = []
    for leaf, path in enumerate(paths):
        variables = [flat[leaf] for flat in per_layer]
        for flat in per_layer:
            flat[leaf] = None
        values = [variable.get_value() for variable in variables]
        if isinstance(values[0], jax.ShapeDtypeStruct):  # an abstract model (ahead-of-time compiles)
            value = jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
        else:
            value = _stack(_stacked_sharding(values[0].sharding))(*values)
        stacked.append((path, _with_axes(variables[0], value, _stacked_axes(variables[0]))))
        del variables, values
    layer = nnx.merge(graphdef, nnx.from_flat_state(stacked))
    model.model.layers = StackedLayers(layer, len(per_layer))
    return True


def unstack_layers(model: nnx.Module, *, delete_stacked: bool = False) -> None:
    """Put ``model.model.layers`` back as an ``nnx.List`` of decoder layers when it is a
    ``StackedLayers`` (each array in its per-layer sharding). ``delete_stacked``: free each
    stacked array once split, even where something else (the train state) still holds it:
    for export, the train state's last use."""
    if not isinstance(model.model.layers, StackedLayers):
        return
    stacked_layers = model.model.layers
    count = stacked_layers.count
    graphdef = nnx.graphdef(stacked_layers.layer)
    flat = [[path, variable] for path, variable in nnx.to_flat_state(nnx.state(stacked_layers.layer))]
    model.model.layers = None
    del stacked_layers
    per_layer = [[] for _ in range(count)]
    for entry in flat:
        path, variable = entry
        entry[1] = None
        value = variable.get_value()
        for layer_leaves, layer_value in zip(per_layer, _split(count, _layer_sharding(value.sharding))(value)):
            layer_leaves.append((path, _with_axes(variable, layer_value, _layer_axes(variable))))
        if delete_stacked:
            value.delete()
        del variable, value
    model.model.layers = nnx.List([nnx.merge(graphdef, nnx.from_flat_state(leaves)) for leaves in per_layer])
