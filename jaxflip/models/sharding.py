"""The one table from logical axis names to mesh axes (MaxText-style).

Modules name the axes of their parameters (``("mlp", "embed")``, ...) and never mesh axes;
this table decides the layout. The mesh has two axes:

* ``dp``: pure data parallelism, parameters replicated;
* ``fsdp``: fully sharded data parallelism, parameters split along their model dimension
  (``embed``, present in every weight matrix) and gathered per layer by XLA.

The batch of activations splits over both. A dimension whose size does not divide evenly
over its mesh axes stays replicated (tiny debug models on many devices).

Activations are constrained by name too (``constrain(x, ("batch", "length",
"activation_embed"))``), as MaxText does: without constraints XLA guesses their layout and
gathers or all-reduces activations and logits; with them every device keeps its batch rows,
and the only collectives of an FSDP step are weight gathers and gradient reductions.
Activation dimensions have their own logical names so that a batch too small to split never
hands its mesh axis to the model dimension. The constraints, and the per-shard bit flips
(``jaxflip.bitflip.flip_tensor``), take the mesh from ``jax.set_mesh`` (see ``OnMesh``);
without a multi-device mesh they do nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxflip.bitflip.lora import LORA_RANK_AXIS

MESH_AXES = ("dp", "fsdp")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("dp", "fsdp"),  # activations: every data-parallel rank takes its own rows
    "length": None,
    "embed": "fsdp",  # the model dimension of every weight: FSDP's shard axis
    "vocab": None,
    "heads": None,
    "kv_heads": None,
    "mlp": None,
    "norm": None,
    LORA_RANK_AXIS: None,
    # activation-only dimensions: whole on every device
    "activation_embed": None,
    "activation_heads": None,
    "activation_kv_heads": None,
    "activation_head_dim": None,
    "activation_mlp": None,
    "activation_vocab": None,
}


def make_mesh(dp: int = 1, fsdp: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dp, fsdp)`` mesh; ``fsdp`` defaults to all devices not used by ``dp``. Its axes are
    ``Auto``: the parameters and the batch carry shardings and XLA propagates them through
    the model (jax's default, ``Explicit``, would demand sharding annotations on every op)."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp = fsdp or len(devices) // dp
    return jax.make_mesh((dp, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[: dp * fsdp])


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    rules: dict = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` for an array whose dimensions have these logical names. A mesh
    axis shards at most one dimension, the first that asks for it (``("batch", "length",
    "embed")`` activations split over the batch only)."""
    spec, used = [], set()
    for i, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} is not in the sharding table ({', '.join(rules)})")
        mesh_axes = rules[name] if name is not None else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(axis for axis in mesh_axes if axis in mesh.shape and axis not in used)
        if shape is not None and shape[i] % math.prod(mesh.shape[axis] for axis in mesh_axes):
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """E.g. ``logical_sharding(mesh, ("batch", "length"))`` for a batch of token ids."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def context_sharding(logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding | None:
    """The sharding of an array with these logical axes on the mesh of the enclosing
    ``jax.set_mesh`` (inside ``jit`` too); None without one, or on a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to its logical axes' layout on the current mesh (see ``context_sharding``)."""
    sharding = context_sharding(logical_axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class OnMesh:
    """A ``jax.jit`` / ``nnx.jit`` function traced, lowered and called under
    ``jax.set_mesh(mesh)``, so the model's activation constraints and per-shard flips see the
    mesh. The context mesh is part of jax's trace cache key: a function traced without it is
    never reused with it."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def _first_param_sharding(model: nnx.Module) -> jax.sharding.Sharding | None:
    # the first Param met, not nnx.state's: that flattens the whole model (50 ms at 22 layers,
    # paid by every sweep evaluation), and all weights lie on one mesh
    first = next((node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)), None)
    return None if first is None else getattr(first.get_value(), "sharding", None)


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh a model's weights are spread over (``create_sharded``, or a checkpoint opened
    with a mesh); None when they live on one device."""
    sharding = _first_param_sharding(model)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def _is_placed(value) -> bool:
    return isinstance(value, jax.Array) and value.committed and not value.weak_type


def _strong(value):
    """A jax array stays one (no trip through the host); anything else goes through numpy,
    since a Python scalar would otherwise become a weakly typed array."""
    if isinstance(value, jax.Array):
        return value.astype(value.dtype) if value.weak_type else value
    return np.asarray(value)


def place_state(model: nnx.Module) -> None:
    """Put every Variable of ``model`` that holds a host value (numpy arrays, Python scalars,
    uncommitted or weakly typed jax arrays: seeds and flip settings set from the host,
    profiling counters, the weights of a model loaded on one device) on the model's mesh,
    replicated, or on its weights' device: committed and strongly typed, as ``nnx.jit`` hands
    back every Variable after a call, in one ``device_put``.

    Call it before each compiled forward of an evaluation loop: ``jit`` keys its compiled
    programs on whether each argument is committed, on its sharding and on its weak type,
    so a forward that first sees host values and then the device values its previous call
    wrote back would compile twice. Values already committed are left where they are (a
    sharded model's weights). On the tests' tiny two-layer Llama (2-core CPU): 5 ms with all 60
    seeds of its 15 flipped Linears set from the host, 1.7 ms (the walk over the model) when
    nothing needs placing."""
    loose = [node for _, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Variable) and not _is_placed(node.get_value())]
    if not loose:
        return
    mesh, sharding = model_mesh(model), _first_param_sharding(model)
    if mesh is not None:
        target = NamedSharding(mesh, PartitionSpec())
    else:
        device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
        target = jax.sharding.SingleDeviceSharding(device)
    placed = jax.device_put([_strong(node.get_value()) for node in loose], target)
    for node, value in zip(loose, placed):
        node.set_value(value)


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)``, or nothing for None (a model on one device)."""
    return jax.set_mesh(mesh) if mesh is not None else nullcontext()


def on_model_mesh(model: nnx.Module):
    """Run the enclosed forwards of ``model`` (eval, generation) on its mesh, if it has one:
    activations constrained, each device flipping its own shards. A loop of forwards finds the
    mesh once with ``model_mesh`` and enters ``mesh_context`` per forward."""
    return mesh_context(model_mesh(model))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A ``NamedSharding`` for every Variable of ``state`` (abstract or concrete), from its
    ``out_sharding`` logical axes; Variables without axes (seeds) are replicated."""

    def sharding_of(variable: nnx.Variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return variable.replace(logical_sharding(mesh, axes, variable.shape))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def array_from_device_slices(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                             read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """An array of ``shape`` laid out by ``sharding``, each distinct slice read once by
    ``read(index)`` and put on every device that holds it (its replicas) before the next is
    read: the host holds one slice at a time (``jax.make_array_from_callback`` reads every
    slice before placing any)."""
    indices = sharding.addressable_devices_indices_map(shape)
    replicas: dict[tuple, list] = {}  # slices are unhashable before Python 3.12: keyed by their bounds
    for device, index in indices.items():
        replicas.setdefault(tuple((part.start, part.stop, part.step) for part in index), []).append(device)
    placed = {}
    for devices in replicas.values():
        host = read(indices[devices[0]])
        placed |= {device: jax.device_put(host, device) for device in devices}
    return jax.make_array_from_single_device_arrays(shape, sharding, [placed[device] for device in indices])


def create_sharded(model_factory: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Build ``model_factory()`` with every parameter created directly in its sharded layout
    (no full copy on one device)."""
    abstract = nnx.eval_shape(model_factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    def create_state():
        return nnx.state(model_factory())

    return nnx.merge(graphdef, jax.jit(create_state, out_shardings=shardings)())
