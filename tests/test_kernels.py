"""Every native kernel build this CPU runs (avx512, avx2) against the plain-PyTorch reference
ops (TorchOps), through the same ops interface the model calls, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantserve import kernels
from quantserve.kernels import bf16
from quantserve.kvcache.paged import AttentionMetadata, PagedKVCache
from quantserve.models.ops import TorchOps
from quantserve.models.rope import RotaryEmbedding

reference = TorchOps()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 16, 33])
@pytest.mark.parametrize("n, k", [(64, 32), (100, 72), (1000, 576)])
def test_linear_matches_reference(native_ops, dtype, m, n, k):
    x, w, b = torch.randn(m, k), torch.randn(n, k).to(dtype), torch.randn(n)
    packed, wtype = native_ops.pack_float(w)
    got = native_ops.linear(x, packed, wtype, n, b)
    if wtype == bf16.W_PAIRS:       # bfloat16 weights on vdpbf16ps: activations rounded to bf16 first
        x = x.bfloat16().float()
    # fp32 sums in another order than torch's: error grows like sqrt(K)
    torch.testing.assert_close(got, x @ w.float().t() + b, atol=1e-4 * k ** 0.5, rtol=1e-5)


def test_linear_rows_do_not_depend_on_batch(native_ops):
    x = torch.randn(23, 320)
    packed, wtype = native_ops.pack_float(torch.randn(200, 320))
    together = native_ops.linear(x, packed, wtype, 200, None)
    alone = torch.cat([native_ops.linear(x[i:i + 1].contiguous(), packed, wtype, 200, None) for i in range(23)])
    assert torch.equal(together, alone)


def test_pack_layout():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    p = kernels.pack_weight(w)
    assert p.shape == (3, 3, 16)
    assert p[1, 2, 5] == w[21, 2] and p[2, 0, 7] == w[39, 0] and p[2, 0, 8] == 0


def decode_setup(dtype, hq, hkv, d, lens, kv_bits=0, blocks=40, bs=16):
    """A one-layer cache filled with random K/V and decode metadata for requests of `lens` tokens."""
    cache = PagedKVCache(1, blocks, bs, hkv, d, dtype, kv_bits=kv_bits)
    cache.write_reference(0, torch.randn(blocks * bs, hkv, d), torch.randn(blocks * bs, hkv, d),
                          torch.arange(blocks * bs))
    width = max(-(-n // bs) for n in lens)
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in lens])
    lens_t = torch.tensor(lens)
    mask = (torch.arange(width * bs) < lens_t[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), len(lens), tables, lens_t, mask, [])
    return cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 32), (16, 2, 128)])
def test_decode_attention_matches_reference(native_ops, dtype, hq, hkv, d):
    cache, meta = decode_setup(dtype, hq, hkv, d, [1, 17, 64, 100])
    q = torch.randn(4, hq, d)
    got = native_ops.decode_attention(q, 0, meta, cache, d ** -0.5)
    torch.testing.assert_close(got, reference.decode_attention(q, 0, meta, cache, d ** -0.5), atol=1e-5, rtol=1e-4)


def test_rmsnorm_with_and_without_residual(native_ops):
    x, res, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    res_ref = res.clone()
    got = native_ops.rmsnorm(x, res, w, 1e-6)
    torch.testing.assert_close(res, res_ref + x)                          # the residual stream, updated in place
    torch.testing.assert_close(got, reference.rmsnorm(x, res_ref, w, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native_ops.rmsnorm(x, None, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))


def test_silu_mul(native_ops):
    gate_up = torch.randn(7, 2 * 96) * 4
    torch.testing.assert_close(native_ops.silu_mul(gate_up), reference.silu_mul(gate_up), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary", [32, 16])
def test_rope_in_place(native_ops, rotary):
    """Whole heads, and the first half of each (partial_rotary_factor 0.5): the rest untouched."""
    rope = RotaryEmbedding(rotary, 10000.0, None, 128, 128)
    x = torch.randn(6, 5 * 32 + 7)                        # 5 heads rotated, extra columns untouched
    pos = torch.tensor([0, 3, 9, 50, 51, 127])
    original, expected = x.clone(), x.clone()
    reference.rope_(expected, 5, 32, pos, rope.cos, rope.sin)
    native_ops.rope_(x, 5, 32, pos, rope.cos, rope.sin)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    heads, before = x[:, :5 * 32].view(6, 5, 32), original[:, :5 * 32].view(6, 5, 32)
    assert torch.equal(heads[..., rotary:], before[..., rotary:]) and torch.equal(x[:, 160:], original[:, 160:])
    assert not torch.allclose(heads[1:, :, :rotary], before[1:, :, :rotary])    # position 0 is the identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_write_rounds_like_torch(native_ops, dtype):
    cache, expected = (PagedKVCache(1, 4, 8, 2, 16, dtype) for _ in range(2))
    k, v = (torch.randn(3, 80)[:, :32].view(3, 2, 16) for _ in range(2))   # strided rows, as out of the qkv output
    slots = torch.tensor([5, 17, 30])
    native_ops.kv_write(cache, 0, k, v, slots)
    reference.kv_write(expected, 0, k, v, slots)
    assert torch.equal(cache.k, expected.k) and torch.equal(cache.v, expected.v)
    assert cache.k.view(-1, 2, 16)[slots].float().abs().sum() > 0
