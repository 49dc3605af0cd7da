"""A randomly initialized Llama, created sharded, at the compile cost of one decoder layer.

``create_sharded(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), mesh)`` compiles the
whole initialization as one program, and almost all of its compile time is the random
normals: each parameter's is its own threefry + inverse-erf computation (about 0.15 s of XLA
compile each on CPU; 156 of them for aixsim-60M's 22 layers, minutes on GPU). Whether the
seed is a compile-time constant or an argument makes no difference to that (measured: see
benchmarks/NOTES.md, "Compile time on CPU").

``nnx.Rngs`` draws every key from one stream, ``fold_in(key(seed), count)`` with the count
advancing by one per draw, in construction order: the embedding, each decoder layer, the LM
head. So a layer's keys depend only on the seed and the count at its start. One jitted
function creates a decoder layer from ``(seed, count)`` and returns the count at its end; it
compiles once and runs once per layer, each layer's parameters born in their shardings. The
parts around the layers are created the same way. The result equals what ``create_sharded``
creates bit for bit (eager construction differs in the last bit of some values: XLA's fused
normals round differently from op-by-op ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxflip.models.llama import Embedding, LlamaDecoderLayer, LlamaForCausalLM, RMSNorm, lm_head_linear
from jaxflip.models.llama_config import LlamaConfig
from jaxflip.models.sharding import state_shardings


def _rngs_at(seed: jax.Array, count: jax.Array) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` after ``count`` draws."""
    rngs = nnx.Rngs(jax.random.key(seed))
    rngs.default.count[...] = count
    return rngs


def _created(make, part_shardings, mesh: Mesh):
    """A jitted ``(seed, count) -> (state, count after)`` that builds ``make(rngs)``, its
    parameters in ``part_shardings``."""

    def create(seed, count):
        rngs = _rngs_at(seed, count)
        return nnx.state(make(rngs)), rngs.default.count[...]

    return jax.jit(create, out_shardings=(part_shardings, NamedSharding(mesh, PartitionSpec())))


def decoder_layer_creator(config: LlamaConfig, mesh: Mesh, shardings: nnx.State | None = None):
    """The jitted ``(seed, count) -> (layer state, count after)`` that creates one decoder
    layer in its shardings (``state_shardings`` of the model's, or of ``shardings``: the
    ``["model"]["layers"][0]`` part of the whole model's)."""
    if shardings is None:
        layer = nnx.eval_shape(lambda: LlamaDecoderLayer(config, rngs=nnx.Rngs(0)))
        shardings = state_shardings(nnx.state(layer), mesh)
    return _created(lambda rngs: LlamaDecoderLayer(config, rngs=rngs), shardings, mesh)


def create_random_llama(config: LlamaConfig, mesh: Mesh, seed: int) -> LlamaForCausalLM:
    """``LlamaForCausalLM(config, rngs=nnx.Rngs(seed))`` with every parameter created directly
    in its sharding (no full copy on one device)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(seed)))
    shardings = state_shardings(nnx.state(model), mesh)

    seed = jnp.int32(seed)
    count = jnp.uint32(0)
    embedding, count = _created(lambda rngs: Embedding(config, rngs=rngs),
                                shardings["model"]["embed_tokens"], mesh)(seed, count)
    nnx.update(model.model.embed_tokens, embedding)
    create_layer = decoder_layer_creator(config, mesh, shardings["model"]["layers"][0])
    for layer in model.model.layers:
        layer_state, count = create_layer(seed, count)
        nnx.update(layer, layer_state)
    norm, _ = _created(lambda rngs: RMSNorm(config), shardings["model"]["norm"], mesh)(seed, count)
    nnx.update(model.model.norm, norm)
    if model.lm_head is not None:
        lm_head, _ = _created(lambda rngs: lm_head_linear(config, rngs), shardings["lm_head"], mesh)(seed, count)
        nnx.update(model.lm_head, lm_head)
    return model
