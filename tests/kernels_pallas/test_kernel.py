"""The kernel's launch settings: defaults, the environment's overrides and their errors; on a
GPU, the compiled kernel at each launch against mase-triton's CUDA kernel."""

import jax.numpy as jnp
import mase_reference as mase
import numpy as np
import pytest

from jaxflip.kernels_pallas import kernel
from jaxflip.kernels_pallas.limits import SEED_LIMIT
from jaxflip.kernels_pallas.philox import FRAC_MASK, SIGN_EXP_MASK


@pytest.fixture
def launch_env(monkeypatch):
    """Set the launch variables for one test; the cached default is re-read before and after."""
    monkeypatch.delenv("JAXFLIP_BITFLIP_LAUNCH", raising=False)
    monkeypatch.delenv("JAXFLIP_BITFLIP_EARLY_EXIT", raising=False)
    kernel.default_launch.cache_clear()
    yield monkeypatch.setenv
    kernel.default_launch.cache_clear()


@pytest.mark.parametrize("halves,launch", [(1, kernel.FEW_CALLS_LAUNCH), (12, kernel.FEW_CALLS_LAUNCH),
                                           (13, kernel.MANY_CALLS_LAUNCH), (24, kernel.MANY_CALLS_LAUNCH)])
def test_groups_of_four_or_more_philox_calls_get_warp_blocks_with_early_exit(launch_env, halves, launch):
    assert kernel.default_launch(halves) == launch


def test_environment_overrides_the_default_launch(launch_env):
    launch_env("JAXFLIP_BITFLIP_LAUNCH", "64/2")
    launch_env("JAXFLIP_BITFLIP_EARLY_EXIT", "0")
    assert kernel.default_launch(24) == kernel.Launch(block=64, num_warps=2, early_exit=False)


@pytest.mark.parametrize("name,value,message", [
    ("JAXFLIP_BITFLIP_LAUNCH", "32", "must be BLOCK/WARPS"),
    ("JAXFLIP_BITFLIP_LAUNCH", "48/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "8/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "64/3", "Launch.num_warps must be a power of two"),
    ("JAXFLIP_BITFLIP_EARLY_EXIT", "yes", "must be 0 or 1"),
])
def test_bad_launch_settings_are_one_line_errors(launch_env, name, value, message):
    launch_env(name, value)
    with pytest.raises(ValueError, match=message):
        kernel.default_launch()


GPU_CASES = [  # shape, exp_halves, frac_halves, zero-out threshold
    ((3, 1777), 2, 5, None),  # not a multiple of any block
    ((257, 255), 13, 16, None),  # four Philox calls per group: where the early exit skips
    ((4111,), 16, 24, 2.0),
    ((70000,), 24, None, 30.0),  # one group skipped
    ((2, 3, 5, 7), None, 13, 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [kernel.FEW_CALLS_LAUNCH, kernel.MANY_CALLS_LAUNCH,
                                    kernel.Launch(block=32, num_warps=1, early_exit=False)],
                         ids=["256-8", "32-1-early-exit", "32-1"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape, exp_halves, frac_halves, threshold", GPU_CASES)
def test_compiled_kernel_is_bit_exact_to_mase_tritons_cuda_kernel(launch, dtype, shape, exp_halves, frac_halves,
                                                                  threshold):
    """On a GPU: the Pallas kernel compiled through Triton (not interpreted), at each launch,
    against mase-triton's CUDA kernel on random data with NaN, inf and large values: every
    output bit, and the keep mask is where the zero-out kept the element."""
    rng = np.random.default_rng()
    values = rng.standard_normal(shape).astype(np.float32) * 3
    specials = rng.choice(values.size, min(40, values.size // 4), replace=False)
    values.reshape(-1)[specials] = rng.choice([np.nan, np.inf, -np.inf, 1e4], specials.size)
    x = np.asarray(jnp.asarray(values).astype(dtype))
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, SEED_LIMIT - 8, 2))
    want = mase.bits_of(mase.mase_forward(mase.to_torch(x, dtype), exp_halves, frac_halves, seed_exp, seed_frac,
                                          threshold)).reshape(-1)
    got, keep = kernel.bitflip_pallas(jnp.asarray(x).reshape(-1), jnp.array([seed_exp, seed_frac, 0, 0], jnp.uint32),
                                      segments=((x.size, 1),), exp_halves=exp_halves, frac_halves=frac_halves,
                                      threshold=threshold, interpret=False, launch=launch)
    got = np.asarray(got).view(want.dtype)
    mismatches = np.flatnonzero(got != want)
    assert mismatches.size == 0, f"{mismatches.size} elements differ from mase-triton, first at {mismatches[:5]}"
    kept = np.ones(x.size, bool) if threshold is None else np.asarray(keep) == 1
    if threshold is not None:
        assert not kept.all() and (got[~kept] == 0).all()
    expected_flips = sum(x.size * bin(mask[dtype]).count("1") * 0.5**halves
                         for halves, mask in ((exp_halves, SIGN_EXP_MASK), (frac_halves, FRAC_MASK)) if halves)
    if expected_flips > 20:
        assert (got != x.reshape(-1).view(want.dtype))[kept].any(), "nothing flipped: the case is vacuous"
