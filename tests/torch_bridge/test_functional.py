"""random_bitflip_fn: the JAX op's flips and seeds on a torch tensor, under mase-triton's name."""

import numpy as np
import pytest
import torch

import jaxflip
from jaxflip.torch_bridge import random_bitflip_fn


def test_the_torch_function_flips_and_advances_seeds_as_the_jax_op():
    rng = np.random.default_rng()
    x = rng.standard_normal((33, 70)).astype(np.float32) * 10
    exp_halves, frac_halves = (int(h) for h in rng.integers(1, 6, size=2))
    seed_exp, seed_frac = (int(s) for s in rng.integers(0, 2**30, size=2))
    y, next_exp, next_frac = random_bitflip_fn(torch.from_numpy(x.copy()), exp_halves, frac_halves,
                                               seed_exp, seed_frac, 20.0)
    want, want_exp, want_frac = jaxflip.random_bitflip(x, exp_halves, frac_halves, seed_exp, seed_frac, 20.0)
    assert np.array_equal(y.numpy().view(np.uint32), np.asarray(want).view(np.uint32))
    assert not np.array_equal(y.numpy(), x)  # halves <= 5 over 2,310 elements: flips happen
    assert (next_exp, next_frac) == (int(want_exp), int(want_frac))


def test_the_old_name_still_works_for_one_release_and_says_so():
    import jaxflip.torch_bridge as bridge

    with pytest.warns(DeprecationWarning, match="use random_bitflip_fn"):
        assert bridge.random_bitflip is random_bitflip_fn


def test_the_names_mase_users_import_give_mase_values():
    from mase_triton.random_bitflip import functional as mase

    from jaxflip.torch_bridge import calculate_flip_probability, find_nearest_prob_n_halves

    rng = np.random.default_rng()
    for halves in [None, *(int(h) for h in rng.integers(1, 60, 20)), 25]:  # above 24 too, as mase computes
        assert calculate_flip_probability(halves) == mase.calculate_flip_probability(halves)
    for p in [None, *rng.uniform(0, 1, 20), *(0.5 ** rng.uniform(1, 40, 20))]:
        assert find_nearest_prob_n_halves(p) == mase.find_nearest_prob_n_halves(p)


def test_the_dropout_layer_has_mase_attributes_and_repr():
    from mase_triton.random_bitflip.layers import RandomBitFlipDropout as MaseDropout

    from jaxflip.torch_bridge import RandomBitFlipDropout

    rng = np.random.default_rng()
    settings = dict(p_exp=float(rng.uniform(1e-6, 0.5)), p_frac=float(rng.uniform(1e-6, 0.5)),
                    zero_out_t=float(rng.uniform(0, 10)), seed_exp=int(rng.integers(100)),
                    seed_frac=int(rng.integers(100)))
    ours, theirs = RandomBitFlipDropout(**settings), MaseDropout(**settings)
    names = ("p_exp", "p_frac", "nearest_exp_halves", "nearest_frac_halves", "zero_out_t", "seed_exp", "seed_frac")
    assert {n: getattr(ours, n) for n in names} == {n: getattr(theirs, n) for n in names}
    assert repr(ours) == repr(theirs)


def test_the_dropout_layer_matches_mase_over_three_calls():
    """mase-triton's layer in the Triton interpreter; a threshold bf16 represents exactly."""
    import mase_reference
    from mase_triton.random_bitflip.layers import RandomBitFlipDropout as MaseDropout

    from jaxflip.torch_bridge import RandomBitFlipDropout

    mase_reference.install_cpu_kernels()
    rng = np.random.default_rng()
    settings = dict(p_exp=0.5**3, p_frac=0.5**2, zero_out_t=4.0, seed_exp=int(rng.integers(100)),
                    seed_frac=int(rng.integers(100)))
    ours, theirs = RandomBitFlipDropout(**settings), MaseDropout(**settings)
    for call in range(3):
        x = torch.from_numpy(rng.standard_normal((16, 40)).astype(np.float32)).to(torch.bfloat16)
        grad_y = torch.from_numpy(rng.standard_normal((16, 40)).astype(np.float32)).to(torch.bfloat16)
        results = []
        for layer in (theirs, ours):
            x_leaf = x.clone().requires_grad_(True)
            y = layer(x_leaf)
            (y * grad_y).sum().backward()
            results.append((y.detach().view(torch.int16), x_leaf.grad.view(torch.int16), layer.seed_exp,
                            layer.seed_frac))
        assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1]), f"call {call}"
        assert results[1][2:] == results[0][2:], f"call {call}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
@pytest.mark.parametrize("halves", [(2, 3), (None, None)], ids=["flips", "no-flips"])
def test_other_dtypes_are_refused_in_one_line_even_without_flips(dtype, halves):
    x = torch.from_numpy(np.random.default_rng().standard_normal(8) * 100).to(dtype)
    with pytest.raises(TypeError, match=r"^random_bitflip_fn: unsupported dtype torch\.\w+; expected float32, "
                                        r"float16 or bfloat16$"):
        random_bitflip_fn(x, *halves, 0, 0, None)


def test_no_flips_and_no_threshold_give_a_copy():
    x = torch.from_numpy(np.random.default_rng().standard_normal(64).astype(np.float32))
    y, _, _ = random_bitflip_fn(x, None, None, 0, 0, None)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_next_seeds_wrap_within_the_contract_alike_in_the_bridge_the_op_and_traced_seeds():
    """2**31 - 9 + ceil(8 / 4) wraps to 1 (modulo 2**31 - 8), which the next call takes; the
    JAX op and a jitted int32 seed (the training state's kind) give the same."""
    import jax
    import jax.numpy as jnp

    x = torch.from_numpy(np.random.default_rng().standard_normal(64).astype(np.float32))
    _, next_exp, next_frac = random_bitflip_fn(x, 8, 7, 2**31 - 9, 2**31 - 10, None)
    assert (next_exp, next_frac) == (1, 0)
    random_bitflip_fn(x, 8, 7, next_exp, next_frac, None)
    _, op_exp, op_frac = jaxflip.random_bitflip(x.numpy(), 8, 7, 2**31 - 9, 2**31 - 10)
    traced = jax.jit(lambda x, s: jaxflip.random_bitflip(x, 8, 7, s, s - 1)[1:])(x.numpy(), jnp.int32(2**31 - 9))
    assert (op_exp, op_frac) == (1, 0) and tuple(int(s) for s in traced) == (1, 0)


def test_an_input_changed_in_place_before_backward_is_an_error():
    x = torch.from_numpy(np.random.default_rng().standard_normal(64).astype(np.float32)).requires_grad_(True)
    flipped_input = x * 2
    y, _, _ = random_bitflip_fn(flipped_input, 3, 4, 0, 0, 8.0)
    with torch.no_grad():
        flipped_input.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_layer_on_meta_tensors_gives_meta_outputs_and_advances_its_seeds():
    """What building a model on the meta device and torch.compile's fake tensors rely on."""
    from jaxflip.torch_bridge import RandomBitFlipLinear

    layer = RandomBitFlipLinear(24, 40, True, "meta", torch.bfloat16, x_p_exp=0.5**3, x_p_frac=0.5**9,
                                x_zero_out_t=16.0, w_p_exp=0.5**13, w_p_frac=0.5**2, w_zero_out_t=None)
    x = torch.empty(5, 24, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert (y.device.type, y.shape, x.grad.device.type) == ("meta", (5, 40), "meta")
    assert (layer.x_seed_exp, layer.x_seed_frac, layer.w_seed_exp, layer.w_seed_frac) == (1, 3, 4, 1)


def test_zero_out_without_flips_compares_in_the_tensor_dtype_as_mase():
    """mase-triton's torch code (not its kernel) zeroes out when nothing flips, comparing with
    the threshold cast to bf16; 0.1003 rounds to the bf16 0.10009765625, which is then zeroed."""
    import mase_reference
    from mase_triton.random_bitflip import functional as mase

    mase_reference.install_cpu_kernels()
    values = np.random.default_rng().uniform(0.09, 0.11, 256).astype(np.float32)
    x = torch.from_numpy(np.append(values, 0.10009765625)).to(torch.bfloat16).requires_grad_(True)
    y, _, _ = random_bitflip_fn(x, None, None, 0, 0, 0.1003)
    expected, _, _ = mase.random_bitflip_fn(x, None, None, 0, 0, 0.1003)
    assert torch.equal(y, expected) and y[-1] == 0


def test_a_negative_threshold_is_refused_without_flips_too():
    x = torch.from_numpy(np.random.default_rng().standard_normal(8).astype(np.float32))
    with pytest.raises(ValueError, match=r"^zero_out_threshold must be >= 0, got -0.5$"):
        random_bitflip_fn(x, None, None, 0, 0, -0.5)
