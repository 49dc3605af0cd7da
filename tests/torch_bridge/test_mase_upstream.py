"""mase-triton's own random_bitflip tests, run against the bridge.

Where the cases come from: mase-triton's repository, ``test/test_random_bitflip_core.py`` and
``test/test_random_bitflip_layers.py`` (read from DeepWok/mase-triton; they are not in the
0.0.7 wheel). Each test below is one of theirs, rewritten here with the bridge's
``random_bitflip_fn``, ``find_nearest_prob_n_halves``, ``RandomBitFlipDropout`` and
``RandomBitFlipLinear`` in place of mase-triton's, on CPU (and on CUDA, marked ``gpu``).
Their settings and assertions are kept; where theirs only logged (the first test, the
zero-out ratio, the search for a flip), an assertion of what they logged is added. On CPU
the tensors are smaller than theirs (``SCALE``: 1024 x 1024 becomes 256 x 256) to keep the
suite fast; on CUDA they are their sizes.
"""

import pytest
import torch

from jaxflip.torch_bridge import (RandomBitFlipDropout, RandomBitFlipLinear, find_nearest_prob_n_halves,
                                  random_bitflip_fn)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SCALE = {"cpu": 4, "cuda": 1}  # their sizes divided by this, per side


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@torch.no_grad()
def test_random_bitflip_forward_simple(device):
    """Theirs printed the bits of 4 flipped bf16 zeros; here fresh random values, whose seeds
    advance by ceil(halves / 4) and whose fraction bits (p = 0.5 each, 28 bits) change."""
    x = torch.randn(4, device=device, dtype=torch.bfloat16)
    out, seed_exp, seed_frac = random_bitflip_fn(x, exp_halves=4, frac_halves=1, seed_exp=0, seed_frac=0,
                                                 zero_out_threshold=None)
    assert (seed_exp, seed_frac) == (1, 1)
    assert not torch.equal(out.view(torch.int16), x.view(torch.int16))


@torch.no_grad()
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_random_bitflip_forward_fully_activated(device, input_dtype):
    side = 1024 // SCALE[device]
    max_tries = 1000
    x = torch.randn(side, side, device=device, dtype=input_dtype)
    for exp_p, frac_p in [(0.5, 0.5), (0.5**4, 0.5**2), (0.5**3.8, 0.5**10)]:
        exp_halves, frac_halves = find_nearest_prob_n_halves(exp_p), find_nearest_prob_n_halves(frac_p)
        seed_exp, seed_frac = 0, 0
        for _ in range(max_tries):
            out, seed_exp, seed_frac = random_bitflip_fn(x, exp_halves=exp_halves, frac_halves=frac_halves,
                                                         seed_exp=seed_exp, seed_frac=seed_frac,
                                                         zero_out_threshold=None)
            assert out.dtype == input_dtype
            assert out.shape == x.shape
            if not torch.equal(x, out):
                break
        else:
            pytest.fail(f"no bitflip in {max_tries} tries")  # theirs logged an error here


@torch.no_grad()
@pytest.mark.parametrize("exp_halves", [1, 2, 3, 4, 5, 6])
def test_random_bitflip_forward_zero_outed(device, exp_halves):
    side = 2048 // SCALE[device]
    x = torch.randn(side, side, device=device, dtype=torch.float32)
    zero_out_threshold = 200.0
    out, _, _ = random_bitflip_fn(x, exp_halves=exp_halves, frac_halves=2, seed_exp=0, seed_frac=0,
                                  zero_out_threshold=zero_out_threshold)
    assert torch.all(torch.isfinite(x))
    # theirs logged the zero-out ratio: every element left is finite and below the threshold
    assert torch.all(out.abs() < zero_out_threshold)
    assert (out == 0).any()  # exponent flips at p >= 1/64 over 262,144 elements: some blow up


@pytest.mark.parametrize("exp_halves", [1, 2, 3])
def test_random_bitflip_fn_backward(device, exp_halves):
    for _ in range(10):
        x = torch.rand(8, device=device, dtype=torch.float32)
        x = x + 0.1
        x.requires_grad_()
        out, _, _ = random_bitflip_fn(x, exp_halves=exp_halves, frac_halves=2, seed_exp=0, seed_frac=0,
                                      zero_out_threshold=200.0)
        torch.sum(out).backward()
        assert torch.all(torch.isfinite(x))
        assert torch.all((out != 0) == (x.grad == 1.0))


def test_random_bitflip_dropout(device):
    bitflip = RandomBitFlipDropout(p_exp=0.5**4, p_frac=0.5**5, zero_out_t=2, seed_exp=1, seed_frac=1)
    for _ in range(4):
        x = torch.randn(8, device=device, dtype=torch.float32)
        x = x + 0.1
        x.requires_grad_()
        out = bitflip(x)
        torch.sum(out).backward()
        assert torch.all(torch.isfinite(x))
        assert torch.all((out != 0) == (x.grad == 1.0))


def test_random_bitflip_linear_act_only(device):
    dtype = torch.float16
    features = bs = 1024 // SCALE[device]
    fc = torch.nn.Linear(features, features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(features, device=device, dtype=dtype).transpose(0, 1))
    bitflip_fc = RandomBitFlipLinear.from_linear(fc, x_p_exp=0.5**3, x_p_frac=0.5**4, x_zero_out_t=1e3, w_p_exp=None,
                                                 w_p_frac=None, w_zero_out_t=None)
    bitflip_fc.train()
    found_bitflip = False
    for _ in range(4):
        x = torch.randn(bs, features, device=device, dtype=dtype)
        x.requires_grad_()
        out = bitflip_fc(x)
        assert torch.all(torch.isfinite(x))
        assert x.shape == out.shape
        torch.sum(out).backward()
        assert x.grad is not None and bitflip_fc.weight.grad is not None  # theirs only touched them
        found_bitflip = not torch.equal(x, out)
        if found_bitflip:
            break
    assert found_bitflip, "theirs logged the mismatch rate of the first flipped call"
