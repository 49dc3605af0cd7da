"""Shared by the converter tests: float32 parity settings (the tiny-model helpers,
``hf_models``, are in tests/)."""

import jax
import pytest



@pytest.fixture(autouse=True)
def float32_matmuls_in_float32():
    """Parity at float32 tolerance needs true float32 matmuls; on GPU XLA would use TF32."""
    with jax.default_matmul_precision("highest"):
        yield
