"""Native CPU kernels against plain-PyTorch references, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantserve import kernels

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="native CPU kernels unavailable (no AVX2 or no cc)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 16, 33])
@pytest.mark.parametrize("n, k", [(64, 32), (100, 72), (1000, 576)])
def test_linear_matches_reference(dtype, m, n, k):
    x, w, b = torch.randn(m, k), torch.randn(n, k).to(dtype), torch.randn(n)
    got = kernels.linear(x, kernels.pack_weight(w), n, b)
    torch.testing.assert_close(got, x @ w.float().t() + b, atol=1e-4 * k ** 0.5, rtol=1e-5)


def test_linear_rows_do_not_depend_on_batch():
    x, w = torch.randn(23, 320), kernels.pack_weight(torch.randn(200, 320))
    together = kernels.linear(x, w, 200, None)
    alone = torch.cat([kernels.linear(x[i:i + 1].contiguous(), w, 200, None) for i in range(23)])
    assert torch.equal(together, alone)


def test_pack_layout():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    p = kernels.pack_weight(w)
    assert p.shape == (3, 3, 16)
    assert p[1, 2, 5] == w[21, 2] and p[2, 0, 7] == w[39, 0] and p[2, 0, 8] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 32), (16, 2, 128)])
def test_decode_attention_matches_sdpa(dtype, hq, hkv, d):
    blocks, bs = 40, 16
    kc, vc = torch.randn(blocks, bs, hkv, d).to(dtype), torch.randn(blocks, bs, hkv, d).to(dtype)
    lens = torch.tensor([1, 17, 64, 100])
    tables = torch.stack([torch.randperm(blocks)[:7] for _ in lens])
    q = torch.randn(len(lens), hq, d)
    got = kernels.decode_attention(q, (kc,), (vc,), tables, lens, d ** -0.5)
    for i, n in enumerate(lens.tolist()):
        k = kc[tables[i]].reshape(-1, hkv, d)[:n].float().transpose(0, 1)     # [Hkv, n, D]
        v = vc[tables[i]].reshape(-1, hkv, d)[:n].float().transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)


def test_add_rmsnorm():
    x, res, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    expected_res = res + x
    expected = F.rms_norm(expected_res, (64,), w, 1e-6)
    got = kernels.add_rmsnorm(x, res, w, 1e-6)
    torch.testing.assert_close(res, expected_res)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.add_rmsnorm(x, None, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))


def test_rope_in_place():
    from quantserve.models.rope import RotaryEmbedding, _rotate_half

    rope = RotaryEmbedding(32, 10000.0, None, 128, 128)
    x = torch.randn(6, 5 * 32 + 7)                        # 5 heads rotated, extra columns untouched
    pos = torch.tensor([0, 3, 9, 50, 51, 127])
    v = x[:, :5 * 32].reshape(6, 5, 32)
    cos, sin = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
    expected = torch.cat([(v * cos + _rotate_half(v) * sin).flatten(1), x[:, 5 * 32:]], dim=1)
    kernels.rope_(x, 5, 32, pos, rope.cos, rope.sin)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_write_rounds_like_torch(dtype):
    cache = torch.zeros(4, 8, 2, 16, dtype=dtype)
    src = torch.randn(3, 40)[:, :32]                      # strided rows
    slots = torch.tensor([5, 17, 30])
    kernels.kv_write(src, slots, cache)
    flat = cache.view(-1, 32)
    assert torch.equal(flat[slots], src.to(dtype))
    others = torch.ones(len(flat), dtype=torch.bool)
    others[slots] = False
    assert not flat[others].float().any()
