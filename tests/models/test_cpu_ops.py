"""The CPU step's compiled attention and GELU (models/cpu_ops.py) against torch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import cpu_ops

H, D = 3, 64


def test_gelu_is_the_tanh_gelu() -> None:
    x = torch.cat([torch.randn(4096) * 3, torch.tensor([0.0, -0.0, 1e-8, -1e-8, 40.0, -40.0, 500.0, -500.0])])
    want = F.gelu(x.double(), approximate="tanh").float()
    got = cpu_ops.gelu_tanh_(x.clone())
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def _dense(qkv: torch.Tensor, cache: torch.Tensor, p_bias: torch.Tensor, slot: torch.Tensor, row_j: torch.Tensor,
           col: torch.Tensor, lcap: int, k: int, scale: float) -> torch.Tensor:
    dh = cache.shape[4]
    """What the dense step computes for these places: the write, then each place over its slot's
    prompt columns (bias 0) and its own row's columns up to its own, by SDPA over every column masked."""
    m = qkv.shape[0]
    q, key, val = qkv.view(m, 3, H, dh).unbind(1)
    w = lcap + col * k + row_j
    cache[0, slot, :, w] = key
    cache[1, slot, :, w] = val
    cols = torch.arange(cache.shape[3])
    gen = cols - lcap
    mine = (gen[None] >= 0) & (gen[None] % k == row_j[:, None]) & (gen[None] // k <= col[:, None])
    prompt = torch.zeros((m, cache.shape[3]), dtype=torch.bool)
    prompt[:, :lcap] = p_bias.view(p_bias.shape[0], lcap)[slot] == 0
    mask = torch.where(prompt | mine, 0.0, float("-inf"))
    o = F.scaled_dot_product_attention(q[:, :, None], cache[0, slot], cache[1, slot], attn_mask=mask[:, None, None],
                                       scale=scale)
    return o.reshape(m, H * dh)


@pytest.mark.parametrize(("spec", "dh"), [(False, D), (True, D), (True, 16)])
def test_attend_writes_and_attends_as_the_masked_dense_step(spec: bool, dh: int) -> None:
    """Two prompt slots (prompts of 5 and 9 tokens right-aligned in 10 columns), 3 rows each at
    different columns; ``spec``: rows feed 3 consecutive places (a speculative step's), some rows
    fewer; the places of a slot need not be all its rows'; heads of ``dh`` dimensions."""
    gen = torch.Generator().manual_seed(0)
    lcap, k, room, ps = 10, 3, 10, 2
    cache = torch.randn((2, ps, H, lcap + room * k, dh), generator=gen)
    p_bias = torch.full((ps, 1, 1, lcap), torch.finfo(torch.float32).min)
    p_bias[0, ..., lcap - 5:] = 0
    p_bias[1, ..., lcap - 9:] = 0
    places = [(0, 0, 2), (0, 2, 0), (1, 0, 4), (1, 1, 1), (1, 2, 6)]  # (slot, row, its column)
    if spec:
        places = [(s, j, c + i) for s, j, c in places for i in range(3 if j != 1 else 2)]
    slot, row_j, col = (torch.tensor(v) for v in zip(*places, strict=True))
    qkv = torch.randn((len(places), 3 * H * dh), generator=gen)
    ref_cache = cache.clone()
    want = _dense(qkv, ref_cache, p_bias, slot, row_j, col, lcap, k, 0.125)
    got = cpu_ops.attend(qkv, cache, p_bias, slot, row_j, col, lcap, k, 0.125)
    assert torch.allclose(got, want, atol=2e-5)
    assert torch.equal(cache, ref_cache)


def test_attend_refuses_a_place_outside_the_cache_and_writes_nothing() -> None:
    cache = torch.zeros((2, 1, H, 4 + 2 * 2, D))
    p_bias = torch.zeros((1, 1, 1, 4))
    one = torch.ones(1, dtype=torch.long)
    for slot, row_j, col in ((one, 0 * one, 0 * one), (0 * one, 2 * one, 0 * one), (0 * one, 0 * one, 2 * one)):
        with pytest.raises(IndexError):
            cpu_ops.attend(torch.ones((1, 3 * H * D)), cache, p_bias, slot, row_j, col, 4, 2, 0.125)
    assert not cache.any()
    with pytest.raises(ValueError):  # a window of the cache, not the cache: the loop reads it as one array
        cpu_ops.attend(torch.ones((1, 3 * H * D)), cache[..., :6, :], p_bias, 0 * one, 0 * one, 0 * one, 4, 2, 0.125)


def test_the_ops_are_registered_for_torchscript() -> None:
    assert cpu_ops.register()

    @torch.jit.script
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.livecopy.gelu_tanh_(x)

    x = torch.randn(64)
    assert torch.allclose(f(x.clone()), F.gelu(x, approximate="tanh"), atol=1e-6)
