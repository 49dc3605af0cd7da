"""``place_state``: host values among a model's state go where ``nnx.jit`` puts them."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflip.compile_count import CompileCount
from jaxflip.models.sharding import make_mesh, place_state


class RunSetting(nnx.Variable):
    """A Variable type place_state does not know by name (as run-time flip settings will be)."""


class Tiny(nnx.Module):
    def __init__(self, weight):
        self.weight = nnx.Param(weight)
        self.python_scalar = RunSetting(3)
        self.numpy_scalar = RunSetting(np.float32(0.5))
        self.host_vector = RunSetting(np.arange(4, dtype=np.int32))

    def __call__(self, x):
        self.python_scalar.set_value(self.python_scalar[...] + 1)
        return x * self.weight[...] * self.numpy_scalar[...] + self.host_vector[...].sum()


@nnx.jit
def forward(model, x):
    return model(x)


def test_host_state_is_placed_committed_and_strongly_typed_and_the_forward_compiles_once():
    model = Tiny(jnp.ones(4))
    place_state(model)
    for variable in (model.python_scalar, model.numpy_scalar, model.host_vector):
        value = variable.get_value()
        assert isinstance(value, jax.Array) and value.committed and not value.weak_type
    assert model.python_scalar[...].dtype == jnp.int32
    assert model.weight.get_value().committed  # nnx.jit writes the weights back committed too
    with CompileCount() as compiles:
        for step in range(3):
            model.numpy_scalar.set_value(np.float32(step))  # set from the host between forwards, as the sweep does
            place_state(model)
            forward(model, jnp.ones(4))
    assert compiles.of("forward") == 1, compiles
    assert int(model.python_scalar[...]) == 6


def test_on_a_mesh_host_state_is_replicated_over_it():
    mesh = make_mesh()
    model = Tiny(jax.device_put(jnp.ones(8), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))))
    place_state(model)
    sharding = model.numpy_scalar.get_value().sharding
    assert sharding.mesh == mesh and sharding.spec == jax.sharding.PartitionSpec()
