"""``CompileCount``: the XLA compiles inside a block, by name."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxflip.compile_count import CompileCount


def test_a_fresh_jit_counts_once_and_its_cached_calls_not_at_all():
    offset = float(np.random.default_rng().integers(1, 1000))  # a new function: nothing cached for it

    @jax.jit
    def shifted(x):
        return x + offset

    ones, zeros = jnp.ones(3), jnp.zeros(3)  # their own eager programs, outside the block
    with CompileCount() as compiles:
        shifted(ones)
        shifted(zeros)
    assert compiles.total == 1 and compiles.of("shifted") == 1, compiles
    longer = jnp.ones(4)
    with CompileCount() as compiles:
        shifted(ones)
        shifted(longer)  # a new shape: a new program
    assert compiles.of("shifted") == 1, compiles


def test_nothing_is_counted_after_the_block():
    with CompileCount() as compiles:
        pass
    jax.jit(lambda x: x * 3)(jnp.ones(5))
    assert compiles.total == 0
