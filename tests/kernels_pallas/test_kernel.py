"""The kernel's launch settings: defaults, the environment's overrides and their errors; the
per-element mode against the jnp path in interpret mode; on a GPU, the compiled kernel at each
launch against mase-triton's CUDA kernel."""

import jax
import jax.numpy as jnp
import mase_reference as mase
import numpy as np
import pytest

from jaxflip.kernels_pallas import kernel
from jaxflip.kernels_pallas.limits import SEED_LIMIT, flip_setting
from jaxflip.kernels_pallas.layout import shard_segments
from jaxflip.kernels_pallas.philox import BITS_DTYPE, FRAC_MASK, SIGN_EXP_MASK, and_call_words, philox4x32, philox_rounds
from jaxflip.kernels_pallas.random_bitflip import random_bitflip


@pytest.fixture
def launch_env(monkeypatch):
    """Set the launch variables for one test; the cached default is re-read before and after."""
    monkeypatch.delenv("JAXFLIP_BITFLIP_LAUNCH", raising=False)
    monkeypatch.delenv("JAXFLIP_BITFLIP_MODE", raising=False)
    kernel.default_launch.cache_clear()
    yield monkeypatch.setenv
    kernel.default_launch.cache_clear()


def test_the_default_launch_continues_per_element(launch_env):
    assert kernel.default_launch() == kernel.DEFAULT_LAUNCH and kernel.DEFAULT_LAUNCH.mode == "per_element"


def test_environment_overrides_the_default_launch(launch_env):
    launch_env("JAXFLIP_BITFLIP_LAUNCH", "64/2")
    launch_env("JAXFLIP_BITFLIP_MODE", "dense")
    assert kernel.default_launch() == kernel.Launch(block=64, num_warps=2, mode="dense")


@pytest.mark.parametrize("name,value,message", [
    ("JAXFLIP_BITFLIP_LAUNCH", "32", "must be BLOCK/WARPS"),
    ("JAXFLIP_BITFLIP_LAUNCH", "48/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "8/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "64/3", "Launch.num_warps must be a power of two"),
    ("JAXFLIP_BITFLIP_MODE", "block_exit", "must be one of dense, per_element"),
    ("JAXFLIP_BITFLIP_LAUNCH", "2048/1", "must be 1 to 32 times 32 \\* num_warps in per_element mode"),
])
def test_bad_launch_settings_are_one_line_errors(launch_env, name, value, message):
    launch_env(name, value)
    with pytest.raises(ValueError, match=message):
        kernel.default_launch()


def calls_needed(index, seed, halves, mask):
    """Per element, the Philox calls its group needs before no masked bit survives (numpy)."""
    q, r = divmod(halves, 4)
    bits = np.full(index.shape, mask, np.uint32)
    needed = np.zeros(index.shape, np.int32)
    for k in range(-(-halves // 4)):
        needed += bits != 0
        bits &= np.asarray(and_call_words(jnp.uint32(0xFFFFFFFF), philox4x32(jnp.asarray(index), jnp.uint32(seed + k),
                                                                            philox_rounds(halves)), 4 if k < q else r))
    return needed


PER_ELEMENT_CASES = [  # dtype, shape, sharded as, exp_halves, frac_halves, seeds, threshold
    ("bfloat16", (4099,), None, 9, 9, "random", 30.0),  # three calls a group; a partial last block
    ("bfloat16", (70, 61), None, 12, 12, "equal", 4.0),  # equal seeds: one shared stream for both groups
    ("float32", (3, 1001), None, 13, 24, "random", None),  # two round counts (12 and 16) in one loop
    ("float16", (5, 777), None, None, 16, "random", 1.0),  # one group
    ("bfloat16", (16, 6, 40), (4, 3, 20), 10, 21, "random", 2.0),  # a shard: several runs of global indices
]


@pytest.mark.parametrize("dtype, shape, local_shape, exp_halves, frac_halves, seeds, threshold", PER_ELEMENT_CASES)
def test_per_element_continuation_equals_the_jnp_path(dtype, shape, local_shape, exp_halves, frac_halves, seeds,
                                                      threshold):
    """Interpret mode (the GPU kernel's body on CPU): per-element continuation flips every bit
    the jnp path flips, writes the keep mask of the zero-out, and continues for some elements
    but not others (the case is not vacuous)."""
    rng = np.random.default_rng()
    global_x = (rng.standard_normal(shape) * 6).astype(np.float32)
    global_x.reshape(-1)[rng.choice(global_x.size, 8, replace=False)] = [np.nan, np.inf, -np.inf, 1e4] * 2
    global_x = jnp.asarray(global_x).astype(dtype)
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, SEED_LIMIT - 8, 2))
    if seeds == "equal":
        seed_frac = seed_exp
    want, *_ = random_bitflip(global_x, exp_halves, frac_halves, seed_exp, seed_frac, threshold, backend="jnp")
    want_bits = np.asarray(jax.lax.bitcast_convert_type(want, BITS_DTYPE[dtype]))
    if local_shape is None:
        local_shape, start = shape, (0,) * len(shape)
    else:  # the shard at block (1, 1, 1): its elements' global indices are not one run
        start = local_shape
    region = tuple(slice(o, o + size) for o, size in zip(start, local_shape))
    base = int(np.ravel_multi_index(start, shape))
    x = global_x[region].reshape(-1)
    scalars = kernel.kernel_scalars(seed_exp, seed_frac, base, flip_setting(exp_halves, frac_halves, threshold))
    got, keep = kernel.bitflip_pallas(x, scalars, segments=shard_segments(shape, local_shape),
                                      zero_out=threshold is not None, interpret=True,
                                      launch=kernel.Launch(128, 1, "per_element"))  # 4 slots a lane
    got_bits = np.asarray(jax.lax.bitcast_convert_type(got, BITS_DTYPE[dtype]))
    np.testing.assert_array_equal(got_bits, want_bits[region].reshape(-1))
    if threshold is not None:  # kept where the flipped value, before zero-out, is below the threshold
        flipped, *_ = random_bitflip(global_x, exp_halves, frac_halves, seed_exp, seed_frac, None, backend="jnp")
        below = np.abs(np.asarray(flipped[region].reshape(-1).astype(jnp.float32))) < threshold
        np.testing.assert_array_equal(np.asarray(keep) == 1, below)
        assert not below.all()
    index = np.arange(global_x.size, dtype=np.uint32).reshape(shape)[region].reshape(-1)
    halves, seed, mask = next((h, s, m[dtype]) for h, s, m in ((exp_halves, seed_exp, SIGN_EXP_MASK),
                                                                 (frac_halves, seed_frac, FRAC_MASK)) if h)
    needed = calls_needed(index, seed, halves, mask)
    assert (needed == 1).any() and (needed >= 2).any(), np.bincount(needed)


GPU_CASES = [  # shape, exp_halves, frac_halves, zero-out threshold, equal seeds
    ((3, 1777), 2, 5, None, False),  # not a multiple of any block
    ((257, 255), 13, 16, None, False),  # four Philox calls per group: where continuation skips
    ((4111,), 16, 24, 2.0, False),
    ((70000,), 24, None, 30.0, False),  # one group skipped
    ((2, 3, 5, 7), None, 13, 0.5, False),
    (((1 << 22) + 3,), 17, 20, 30.0, False),  # large and odd, two round counts
    ((1023, 517), 24, 24, 1.0, True),  # equal seeds: both groups from one Philox stream
    ((999, 4097), 14, 14, None, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [kernel.DEFAULT_LAUNCH, kernel.Launch(block=256, num_warps=8, mode="dense"),
                                    kernel.Launch(block=2048, num_warps=2, mode="per_element")],
                         ids=["default", "256-8-dense", "2048-2-per-element"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape, exp_halves, frac_halves, threshold, equal_seeds", GPU_CASES)
def test_compiled_kernel_is_bit_exact_to_mase_tritons_cuda_kernel(launch, dtype, shape, exp_halves, frac_halves,
                                                                  threshold, equal_seeds):
    """On a GPU: the Pallas kernel compiled through Triton (not interpreted), at each launch,
    against mase-triton's CUDA kernel on random data with NaN, inf and large values: every
    output bit, and the keep mask is where the zero-out kept the element."""
    rng = np.random.default_rng()
    values = rng.standard_normal(shape).astype(np.float32) * 3
    specials = rng.choice(values.size, min(40, values.size // 4), replace=False)
    values.reshape(-1)[specials] = rng.choice([np.nan, np.inf, -np.inf, 1e4], specials.size)
    x = np.asarray(jnp.asarray(values).astype(dtype))
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, SEED_LIMIT - 8, 2))
    if equal_seeds:
        seed_frac = seed_exp
    want = mase.bits_of(mase.mase_forward(mase.to_torch(x, dtype), exp_halves, frac_halves, seed_exp, seed_frac,
                                          threshold)).reshape(-1)
    scalars = kernel.kernel_scalars(seed_exp, seed_frac, 0, flip_setting(exp_halves, frac_halves, threshold))
    got, keep = kernel.bitflip_pallas(jnp.asarray(x).reshape(-1), scalars, segments=((x.size, 1),),
                                      zero_out=threshold is not None, interpret=False, launch=launch)
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
