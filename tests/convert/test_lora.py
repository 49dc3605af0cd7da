"""A model with trained LoRA factors -> orbax-to-hf --merge-lora -> transformers computes the
LoRA model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_models import flax_twin, hf_logits, random_hf_model, random_tokens, relative_error, tiny_hf_config

from jaxflip.bitflip import LoRAParam, add_lora
from jaxflip.convert.__main__ import main
from jaxflip.data import builtin_tokenizer_dir
from jaxflip.models import save


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A saved model whose every LoRA factor is random and non-zero (as after training)."""
    rng = np.random.default_rng()
    base = random_hf_model(tiny_hf_config(), rng)
    model = flax_twin(base)
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(int(rng.integers(2**31))))
    trained = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype), nnx.state(model, LoRAParam))
    nnx.update(model, trained)
    path = save(model, tmp_path_factory.mktemp("lora") / "orbax", tokenizer_dir=builtin_tokenizer_dir())
    return model, path, base, rng


def test_merged_hf_model_computes_the_lora_logits(lora_checkpoint, tmp_path):
    model, path, base, rng = lora_checkpoint
    assert main(["orbax-to-hf", str(path), str(tmp_path / "hf"), "--merge-lora"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tokens = random_tokens(rng, model.config, (2, 24))
    lora_logits = np.asarray(model(jnp.asarray(tokens)))
    assert relative_error(hf_logits(merged, tokens), lora_logits) < 1e-4
    # not vacuous: the adapters move the logits well beyond that tolerance
    assert relative_error(hf_logits(base, tokens), lora_logits) > 1e-2


def test_lora_checkpoint_without_merge_is_refused(lora_checkpoint, tmp_path, capsys):
    _, path, _, _ = lora_checkpoint
    assert main(["orbax-to-hf", str(path), str(tmp_path / "hf")]) == 2
    assert "pass --merge-lora" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
