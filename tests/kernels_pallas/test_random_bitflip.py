"""random_bitflip against mase-triton (the referee, run by the Triton interpreter on CPU or
natively on GPU), between its own backends, and against its contract."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxflip
from jaxflip.kernels_pallas.limits import flip_setting
from jaxflip.kernels_pallas.random_bitflip import flip_with_setting
import mase_reference as mase

if mase.available():
    import triton
    import triton.language as tl

    @triton.jit
    def _randint4x_kernel(out_ptr, seed, offset_base, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = offset_base + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, offsets, n_rounds=N_ROUNDS)
        positions = tl.arange(0, BLOCK)
        tl.store(out_ptr + positions, r0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + BLOCK + positions, r1.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 2 * BLOCK + positions, r2.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 3 * BLOCK + positions, r3.to(tl.int32, bitcast=True))

pytestmark = pytest.mark.skipif(not mase.available(), reason="mase-triton (parity extra) is not installed")

DTYPES = ["float32", "float16", "bfloat16"]
BITS = {"float32": jnp.uint32, "float16": jnp.uint16, "bfloat16": jnp.uint16}
SHAPE = (3, 1777)  # 5331 elements: not a multiple of any block size


def random_input(shape, dtype, seed, specials=False):
    x = np.array(jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 3)
    if specials:
        flat = x.reshape(-1)
        positions = np.random.default_rng(seed).choice(flat.size, 40, replace=False)
        flat[positions[:10]] = np.nan
        flat[positions[10:20]] = np.inf
        flat[positions[20:30]] = -np.inf
        flat[positions[30:]] = 1e4
    return np.asarray(jnp.asarray(x).astype(dtype))


def bits(y):
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(y), BITS[jnp.dtype(y.dtype).name]))


def assert_matches_mase(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold, backend=None):
    dtype = jnp.dtype(x.dtype).name
    expected = mase.mase_forward(mase.to_torch(x, dtype), exp_halves, frac_halves, seed_exp, seed_frac, threshold)
    y, _, _ = jaxflip.random_bitflip(jnp.asarray(x), exp_halves, frac_halves, seed_exp, seed_frac, threshold,
                                     backend=backend)
    got, want = bits(y).reshape(-1), mase.bits_of(expected).reshape(-1)
    mismatches = np.flatnonzero(got != want)
    assert mismatches.size == 0, f"{mismatches.size} elements differ from mase-triton, first at {mismatches[:5]}"
    group_bits = {"float32": (9, 23), "float16": (6, 10), "bfloat16": (9, 7)}[dtype]
    expected_flips = sum(x.size * width * 0.5**h for h, width in zip((exp_halves, frac_halves), group_bits) if h)
    if expected_flips > 20:
        assert (got != bits(x).reshape(-1)).any(), "nothing flipped: test is vacuous"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("halves", range(1, 25))
def test_every_halves_matches_mase(dtype, halves):
    x = random_input(SHAPE, dtype, seed=halves)
    # exp takes every halves and frac every other (25 - h), so each group sees 1..24.
    assert_matches_mase(x, halves, 25 - halves, seed_exp=3 * halves, seed_frac=1000 + halves, threshold=None)


@pytest.mark.parametrize("n_rounds", [10, 12, 16])
@pytest.mark.parametrize("seed,offset_base", [(0, 0), (12345, 7), (2**31 - 9, 2**31 - 4096)])
def test_philox_words_match_triton_randint4x(n_rounds, seed, offset_base):
    from jaxflip.kernels_pallas.philox import philox4x32

    block = 4096
    out = torch.empty(4 * block, dtype=torch.int32, device=mase.device())
    _randint4x_kernel[(1,)](out, seed, offset_base, N_ROUNDS=n_rounds, BLOCK=block)
    want = out.cpu().numpy().view(np.uint32).reshape(4, block)
    index = jnp.arange(block, dtype=jnp.uint32) + jnp.uint32(offset_base)
    got = np.stack([np.asarray(w) for w in philox4x32(index, jnp.uint32(seed), n_rounds)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp_halves,frac_halves", [(None, 1), (None, 6), (None, 17), (2, None), (9, None), (21, None)])
def test_one_group_none_matches_mase(dtype, exp_halves, frac_halves):
    x = random_input(SHAPE, dtype, seed=7)
    assert_matches_mase(x, exp_halves, frac_halves, seed_exp=5, seed_frac=9, threshold=None)


@pytest.mark.parametrize("seed_exp,seed_frac", [(0, 0), (1, 123456), (2**20 + 3, 77), (2**31 - 9, 2**31 - 100)])
def test_seeds_match_mase(seed_exp, seed_frac):
    x = random_input(SHAPE, "float32", seed=11)
    assert_matches_mase(x, 3, 5, seed_exp, seed_frac, threshold=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 5, 7), (4, 1, 33, 31), (70000,)])
def test_shapes_match_mase(dtype, shape):
    x = random_input(shape, dtype, seed=len(shape))
    assert_matches_mase(x, 2, 4, seed_exp=13, seed_frac=14, threshold=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 2.0, 300.0, math.inf])
def test_zero_out_with_specials_matches_mase(dtype, threshold):
    x = random_input(SHAPE, dtype, seed=21, specials=True)
    assert_matches_mase(x, 3, 6, seed_exp=1, seed_frac=2, threshold=threshold)


INTERPRET_SETTINGS = [(1, 1, None), (4, 13, 2.0), (None, 20, 1.0), (24, None, None)]


# each setting with one dtype (and each dtype) in the default run; the whole cross product, 7 s a
# case in the interpreter, only with the slow tests
@pytest.mark.parametrize("dtype, exp_halves, frac_halves, threshold", [
    pytest.param(dtype, *setting, marks=() if DTYPES.index(dtype) == k % len(DTYPES) else pytest.mark.slow)
    for k, setting in enumerate(INTERPRET_SETTINGS) for dtype in DTYPES])
def test_pallas_interpret_equals_jnp(dtype, exp_halves, frac_halves, threshold):
    x = jnp.asarray(random_input((5, 3, 411), dtype, seed=31, specials=True))
    y_jnp, *seeds_jnp = jaxflip.random_bitflip(x, exp_halves, frac_halves, 8, 9, threshold, backend="jnp")
    y_pallas, *seeds_pallas = jaxflip.random_bitflip(x, exp_halves, frac_halves, 8, 9, threshold, backend="interpret")
    np.testing.assert_array_equal(bits(y_pallas), bits(y_jnp))
    assert seeds_pallas == seeds_jnp


@pytest.mark.slow  # two interpret-mode kernel compiles: 30-60 s on 2 CPU cores (native on a GPU)
@pytest.mark.parametrize("launch", [(1024, 1, "per_element"), (32, 1, "dense")])
def test_large_and_warp_sized_blocks_equal_jnp(launch):
    """The kernel at 32 slots a lane (the GPU's default) and at 32 elements / 1 warp, against
    the jnp path, on bf16 with zero-out and float32 (23 fraction bits) without."""
    from jaxflip.kernels_pallas.kernel import Launch, bitflip_pallas, kernel_scalars

    interpret = jax.default_backend() != "gpu"
    for dtype, exp_halves, frac_halves, threshold in (("bfloat16", 24, 12, 2.0), ("float32", 16, 24, None)):
        x = jnp.asarray(random_input((4111,), dtype, seed=33, specials=True))
        want, *_ = jaxflip.random_bitflip(x, exp_halves, frac_halves, 8, 9, threshold, backend="jnp")
        scalars = kernel_scalars(8, 9, 0, flip_setting(exp_halves, frac_halves, threshold))
        got, _ = bitflip_pallas(x, scalars, segments=((x.size, 1),), zero_out=threshold is not None,
                                interpret=interpret, launch=Launch(*launch))
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=dtype)


# the interpreter on 16-bit floats only with the slow tests: the kernel's 16-bit path is checked
# against the jnp path in test_pallas_interpret_equals_jnp, whose gradient runs here
@pytest.mark.parametrize("dtype, backend", [(dtype, backend) if backend == "jnp" or dtype == "float32" else
                                            pytest.param(dtype, backend, marks=pytest.mark.slow)
                                            for backend in ("jnp", "interpret") for dtype in DTYPES])
def test_gradient_matches_mase_backward(dtype, backend):
    x = random_input(SHAPE, dtype, seed=41, specials=True)
    grad_y = random_input(SHAPE, dtype, seed=42)
    args = (4, 9, 17, 23, 1.5)
    _, vjp = jax.vjp(lambda v: jaxflip.random_bitflip(v, *args, backend=backend)[0], jnp.asarray(x))
    (grad_x,) = vjp(jnp.asarray(grad_y))
    expected = mase.mase_backward(mase.to_torch(x, dtype), mase.to_torch(grad_y, dtype), *args)
    np.testing.assert_array_equal(bits(grad_x), mase.bits_of(expected))
    assert (bits(grad_x) != bits(grad_y)).any(), "zero-out masked nothing: test is vacuous"


def test_gradient_without_zero_out_is_identity():
    x = jnp.asarray(random_input(SHAPE, "float32", seed=43))
    grad_y = jnp.asarray(random_input(SHAPE, "float32", seed=44))
    _, vjp = jax.vjp(lambda v: jaxflip.random_bitflip(v, 2, 2, 0, 0)[0], x)
    np.testing.assert_array_equal(np.asarray(vjp(grad_y)[0]), np.asarray(grad_y))


@pytest.mark.parametrize("exp_halves,frac_halves", [(1, 1), (4, 8), (5, 13), (24, 19), (None, 3), (7, None)])
def test_seeds_advance_as_mase(exp_halves, frac_halves):
    mase.install_cpu_kernels()
    from mase_triton.random_bitflip.functional import random_bitflip_fn

    x = random_input((257,), "float32", seed=51)
    _, want_exp, want_frac = random_bitflip_fn(mase.to_torch(x, "float32"), exp_halves or 1, frac_halves or 1, 100, 200, None)
    _, got_exp, got_frac = jaxflip.random_bitflip(jnp.asarray(x), exp_halves, frac_halves, 100, 200)
    assert (got_exp if exp_halves else want_exp) == want_exp and isinstance(got_exp, int)
    assert (got_frac if frac_halves else want_frac) == want_frac and isinstance(got_frac, int)
    assert got_exp == (100 if exp_halves is None else want_exp)
    assert got_frac == (200 if frac_halves is None else want_frac)


def test_traced_seeds_under_jit_match_python_seeds():
    x = jnp.asarray(random_input(SHAPE, "bfloat16", seed=61))

    @jax.jit
    def step(x, seed_exp, seed_frac):
        return jaxflip.random_bitflip(x, 6, 11, seed_exp, seed_frac, 4.0)

    y_traced, next_exp, next_frac = step(x, jnp.int32(1234), jnp.int32(99))
    y_python, want_exp, want_frac = jaxflip.random_bitflip(x, 6, 11, 1234, 99, 4.0)
    np.testing.assert_array_equal(bits(y_traced), bits(y_python))
    assert isinstance(next_exp, jax.Array) and next_exp.dtype == jnp.int32
    assert (int(next_exp), int(next_frac)) == (want_exp, want_frac)


def test_remat_recomputes_the_same_flips():
    x = jnp.asarray(random_input(SHAPE, "float32", seed=71))
    w = jnp.asarray(random_input((1777,), "float32", seed=72))

    def loss(x, seed):
        y, _, _ = jaxflip.random_bitflip(x, 3, 3, seed, seed + 1, 2.0)
        return jnp.sum(jnp.sin(y) * w)

    plain = jax.grad(loss)(x, jnp.int32(5))
    remat = jax.grad(jax.checkpoint(loss))(x, jnp.int32(5))
    np.testing.assert_array_equal(np.asarray(remat), np.asarray(plain))


def test_no_flip_groups_only_zero_out():
    x = jnp.asarray(random_input(SHAPE, "float16", seed=81, specials=True))
    y, seed_exp, seed_frac = jaxflip.random_bitflip(x, None, None, 3, 4, 1.0)
    xf = np.asarray(x.astype(jnp.float32))
    expected = np.where(np.abs(xf) < 1.0, xf, 0.0)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), expected)
    assert (seed_exp, seed_frac) == (3, 4)
    untouched, *_ = jaxflip.random_bitflip(x, None, None, 3, 4)
    assert untouched is x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("halves", [1, 2, 3, 5, 8])
def test_flip_rate_per_bit_is_binomial(dtype, halves):
    n = 1 << 20
    x = jax.random.normal(jax.random.key(halves), (n,), jnp.float32).astype(dtype)
    y, _, _ = jaxflip.random_bitflip(x, halves, halves, 17 * halves, 31 * halves)
    flips = np.asarray(bits(x) ^ bits(y))
    width = flips.dtype.itemsize * 8
    counts = np.array([np.count_nonzero((flips >> b) & 1) for b in range(width)])
    p = 0.5**halves
    sigma = math.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 6 * sigma), (counts, n * p, sigma)


def cpu_mesh():
    """A (fsdp=4, dp=2) mesh of the 8 host CPU devices conftest asks for (also on a GPU machine)."""
    from jax.sharding import Mesh

    devices = jax.devices("cpu")
    assert len(devices) >= 8, "conftest sets --xla_force_host_platform_device_count=8"
    return Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "dp"))


def test_sharded_jnp_path_equals_unsharded_without_gather():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = cpu_mesh()
    x = jnp.asarray(random_input((16, 6, 40), "bfloat16", seed=91))
    expected, *_ = jaxflip.random_bitflip(x, 3, 4, 5, 6, 2.0, backend="jnp")
    for spec in [P("fsdp"), P(None, "dp", "fsdp"), P(("fsdp", "dp")), P("dp", None, "fsdp")]:
        sharding = NamedSharding(mesh, spec)
        flip = jax.jit(lambda v: jaxflip.random_bitflip(v, 3, 4, 5, 6, 2.0, backend="jnp")[0],
                       in_shardings=sharding, out_shardings=sharding)
        hlo = flip.lower(jax.device_put(x, sharding)).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, f"{spec}: input gathered"
        y = flip(jax.device_put(x, sharding))
        np.testing.assert_array_equal(bits(y), bits(expected), err_msg=str(spec))


def test_sharded_pallas_kernel_equals_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = cpu_mesh()
    x = jnp.asarray(random_input((16, 6, 40), "float32", seed=92))
    expected, *_ = jaxflip.random_bitflip(x, 5, 2, 7, 8, 3.0, backend="jnp")
    for spec in [P("fsdp"), P(None, "dp", "fsdp"), P(("fsdp", "dp")), P("dp", None, "fsdp")]:
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        y, *_ = jaxflip.random_bitflip(sharded, 5, 2, 7, 8, 3.0, backend="interpret")
        assert y.sharding.is_equivalent_to(sharded.sharding, x.ndim), f"{spec}: output resharded"
        np.testing.assert_array_equal(bits(y), bits(expected), err_msg=str(spec))


OUT_OF_SEED_RANGE = r"must be an int in \[0, 2\*\*31 - 8\)"


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda x: jaxflip.random_bitflip(x.astype(jnp.int32), 2, 2, 0, 0), TypeError, "unsupported dtype"),
        (lambda x: jaxflip.random_bitflip(x, 0, 2, 0, 0), ValueError, "exp_halves must be in 1..24"),
        (lambda x: jaxflip.random_bitflip(x, 2, 25, 0, 0), ValueError, "frac_halves must be in 1..24"),
        (lambda x: jaxflip.random_bitflip(x, 2.0, 2, 0, 0), TypeError, "exp_halves must be an int"),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, 0, 0, -1.0), ValueError, "zero_out_threshold must be >= 0"),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, -1, 0), ValueError, "seed_exp " + OUT_OF_SEED_RANGE),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, 0, 2**31 - 8), ValueError, "seed_frac " + OUT_OF_SEED_RANGE),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, 0.5, 0), TypeError, "seed_exp must be an int"),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, jnp.int32(-1), 0), ValueError, "seed_exp " + OUT_OF_SEED_RANGE),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, 0, jnp.int32(2**31 - 2)), ValueError, "seed_frac " + OUT_OF_SEED_RANGE),
        (lambda x: jaxflip.random_bitflip(x, 2, 2, 0, jnp.uint32(2**32 - 1)), ValueError, "seed_frac " + OUT_OF_SEED_RANGE),
        (lambda x: jaxflip.find_nearest_prob_n_halves(1.0), ValueError, "in \\(0, 1\\)"),
        (lambda x: jaxflip.find_nearest_prob_n_halves(0.0), ValueError, "in \\(0, 1\\)"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(jnp.ones((4,), jnp.float32))


def test_probability_helpers_match_mase():
    from mase_triton.random_bitflip import core

    for p in [0.5, 0.3, 0.01, 1e-5, 0.5**16, 3e-8]:
        assert jaxflip.find_nearest_prob_n_halves(p) == core.find_nearest_prob_n_halves(p)
    for h in range(1, 25):
        assert jaxflip.calculate_flip_probability(h) == core.calculate_flip_probability(h)
    assert jaxflip.find_nearest_prob_n_halves(None) is None
    assert jaxflip.calculate_flip_probability(None) is None


def test_subnormal_probabilities_have_halves_too():
    """1 / p overflows below 2**-1024; the halves are still ceil(log2(1 / p))."""
    assert jaxflip.find_nearest_prob_n_halves(5e-324) == 1074  # the smallest float64: 2**-1074
    exponent = int(np.random.default_rng().integers(1025, 1073))  # 0.75 * 2**-exponent stays exact
    assert jaxflip.find_nearest_prob_n_halves(2.0**-exponent) == exponent
    assert jaxflip.find_nearest_prob_n_halves(2.0**-exponent * 0.75) == exponent + 1


def test_an_eager_call_runs_compiled_within_2x_of_the_jitted_call():
    """Outside jit the op would run primitive by primitive (two orders of magnitude slower, a
    full-size array per primitive); after its first call an eager call costs what a jitted one does."""
    import time

    x = jnp.asarray(random_input((2**20,), "float32", seed=int(np.random.default_rng().integers(1000))))
    flip = partial(jaxflip.random_bitflip, exp_halves=3, frac_halves=2, seed_exp=5, seed_frac=9,
                   zero_out_threshold=30.0, backend="jnp")
    jitted = jax.jit(lambda x: flip(x)[0])

    def best_time(call):
        call(x).block_until_ready()  # compiles
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call(x).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    eager_y = flip(x)[0]
    np.testing.assert_array_equal(bits(eager_y), bits(jitted(x)))
    assert best_time(lambda x: flip(x)[0]) < 2 * best_time(jitted) + 0.01


def test_eager_calls_of_any_halves_threshold_and_seeds_trace_and_compile_the_flip_once(monkeypatch):
    """New halves, thresholds and seeds (Python ints or JAX scalars) of the same shape and dtype
    reuse the compiled flip: the settings are run-time data, no trace after the first call."""
    import importlib

    module = importlib.import_module("jaxflip.kernels_pallas.random_bitflip")
    traces = []
    flip_forward = module._flip_forward

    def counting_flip_forward(*args, **kwargs):
        traces.append(args[3])
        return flip_forward(*args, **kwargs)

    monkeypatch.setattr(module, "_flip_forward", counting_flip_forward)
    rng = np.random.default_rng()
    shape = (3, int(rng.integers(40, 4000)), 5)  # a shape no other test compiled
    seeds = rng.integers(0, 2**30, size=(4, 2))
    calls = [((4, 7, float(rng.uniform(2, 40))), (int(seeds[0, 0]), int(seeds[0, 1]))),
             ((1, None, 3.0), (int(seeds[1, 0]), int(seeds[1, 1]))),
             ((None, 24, 1e9), (jnp.int32(seeds[2, 0]), jnp.uint32(seeds[2, 1]))),
             ((16, 13, 0.5), (int(seeds[3, 0]), int(seeds[3, 0])))]
    x = jnp.asarray(random_input(shape, "float32", int(seeds[0, 0])))
    results = [jaxflip.random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, threshold)[0]
               for (exp_halves, frac_halves, threshold), (seed_exp, seed_frac) in calls]
    assert len(traces) == 1 and traces[0].zero_out
    for (settings, seeds_of_call), got in zip(calls, results):  # each call flipped as its own settings say
        want, *_ = jaxflip.random_bitflip(x, *settings[:2], *seeds_of_call, settings[2], backend="interpret")
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=str(settings))
    assert not np.array_equal(bits(results[0]), bits(results[1]))


def test_an_eager_call_takes_within_2x_the_memory_of_the_jitted_call():
    """Peak resident memory of a call on 2**22 float32 elements, after its first call: op by
    op it was ~17x the input (a full-size array per primitive); compiled, what the jitted
    program of the same run-time setting takes (the settings are arguments of both)."""
    import gc

    def resident_kib(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    def peak_growth(call) -> int:
        call().block_until_ready()  # compiles
        gc.collect()
        before = resident_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) starts again from the current resident size
        y = call()
        y.block_until_ready()
        growth = (resident_kib("VmHWM") - before) * 1024
        del y
        return growth

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError as error:
        pytest.skip(f"the peak resident size cannot be reset here ({error})")
    x = jnp.asarray(random_input((2**22,), "float32", seed=int(np.random.default_rng().integers(1000))))
    flip = partial(jaxflip.random_bitflip, exp_halves=3, frac_halves=2, seed_exp=5, seed_frac=9,
                   zero_out_threshold=30.0, backend="jnp")
    setting = flip_setting(3, 2, 30.0)
    jitted = jax.jit(lambda x, setting: flip_with_setting(x, setting, 5, 9, backend="jnp")[0])
    jitted_growth = peak_growth(lambda: jitted(x, setting))
    eager_growth = peak_growth(lambda: flip(x)[0])
    assert eager_growth <= 2 * max(jitted_growth, x.nbytes), (eager_growth, jitted_growth)
