"""Online KV cache quantization: reference primitives, native kernels, attention accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantserve.kvcache import quant
from quantserve.kvcache.paged import AttentionMetadata, PagedKVCache

@pytest.mark.parametrize("bits, groups", [(8, 1), (4, 1), (4, 2)])
def test_dequantization_error_within_half_scale(bits, groups):
    """int8: every element within scale / 2. int4 quantizes the Hadamard-rotated vector, so the
    bound holds there, and (H orthogonal) for the error's norm: ||e|| <= sqrt(D) * scale / 2."""
    x = torch.randn(500, 8, 64) * torch.rand(500, 8, 1) * 10 + torch.randn(500, 8, 1)
    stored, scale, zero = quant.quantize_kv(x, bits, groups)
    x2 = quant.dequantize_kv(stored, scale, zero, bits)
    if groups == 2:
        assert scale.shape == (500, 8, 2)
        scale = scale.float().amax(-1)                   # the per-head bound uses the larger step
    half = scale.float().unsqueeze(-1) / 2 * (1 + 1e-5)
    if bits == 8:
        assert ((x - x2).abs() <= half).all()
    else:
        h = quant.hadamard(64)
        assert ((x @ h - x2 @ h).abs() <= half + 1e-5).all()
        assert ((x - x2).norm(dim=-1) <= 8 * half.squeeze(-1) + 1e-4).all()
    assert stored.shape[-1] == 64 * bits // 8


def test_hadamard_is_orthogonal_and_symmetric():
    h = quant.hadamard(128)
    torch.testing.assert_close(h @ h, torch.eye(128), atol=1e-6, rtol=0)
    assert torch.equal(h, h.t())


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (7, 3, 32), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)


def test_round_up_half():
    x = torch.rand(10000) * 10 + 1e-4
    h = quant.round_up_half(x)
    assert (h.float() >= x).all()
    assert (h.view(torch.int16) - 1).view(torch.float16).float().lt(x).all()   # the smallest such half


@pytest.mark.parametrize("bits, rows, dims", [(8, 100, 16), (4, 100, 16)])
def test_all_zero_and_constant_heads(bits, rows, dims):
    x = torch.zeros(rows, dims)
    x[1] = 3.0
    x[2] = -0.25
    stored, scale, zero = quant.quantize_kv(x, bits)
    x2 = quant.dequantize_kv(stored, scale, zero, bits)
    assert torch.equal(x2[3:], x[3:])                                    # all-zero heads are exact
    bound = scale.float().unsqueeze(-1) / 2 * (1 if bits == 8 else 4) + 1e-6   # int4: ||e|| bound, sqrt(16)
    assert ((x2 - x).abs() <= bound).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_native_write_equals_reference(native_ops, bits):
    torch.manual_seed(1)
    hkv, d = 3, 64
    cache, expected = (PagedKVCache(2, 10, 16, hkv, d, torch.float32, kv_bits=bits) for _ in range(2))
    k, v = (torch.randn(9, 2 * hkv * d)[:, :hkv * d].view(9, hkv, d) * 4 for _ in range(2))   # strided rows
    slots = torch.tensor([0, 5, 16, 17, 40, 63, 100, 150, 159])
    native_ops.kv_write(cache, 1, k, v, slots)
    expected.write_reference(1, k, v, slots)
    for which in ("k", "v"):
        assert all(torch.equal(a, b) for a, b in zip(cache.parts(which, 1), expected.parts(which, 1)))
    codes, scale, zero = quant.quantize_kv(k, bits, quant.groups_for("k", bits))
    data, s, z = (p.view(-1, *p.shape[2:]) for p in cache.parts("k", 1))
    assert torch.equal(data[slots], codes)
    assert torch.equal(s[slots], scale) and torch.equal(z[slots], zero)


@pytest.mark.parametrize("bits", [8, 4])
def test_paged_write_then_read_is_quantize_dequantize(bits):
    hkv, d, bs = 2, 32, 8
    cache = PagedKVCache(1, 6, bs, hkv, d, torch.float32, kv_bits=bits)
    k, v = torch.randn(20, hkv, d), torch.randn(20, hkv, d)
    blocks = torch.tensor([4, 1, 3])
    slots = torch.cat([blocks[i // bs:i // bs + 1] * bs + i % bs for i in range(20)])
    cache.write_reference(0, k, v, slots)
    rk, rv = cache.read(0, blocks)
    for got, x, which in ((rk, k, "k"), (rv, v, "v")):
        expected = quant.dequantize_kv(*quant.quantize_kv(x, bits, quant.groups_for(which, bits)), bits)
        torch.testing.assert_close(got[:20], expected, atol=1e-6, rtol=0)


def attention_reference(q, k, v):
    """q: [Hq, D]; k, v: [S, Hkv, D] -> [Hq, D]."""
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1),
                                          enable_gqa=True).squeeze(1)


# int4 min/max quantization of Gaussian vectors has a noise floor of step / sqrt(12) ~ 0.1 of the
# signal (step = range / 14 ~ 4.8 sigma / 14) before K's error is added: 0.10-0.14 is measured here
@pytest.mark.parametrize("bits, tolerance", [(8, 1e-2), (4, 0.15)])
def test_quantized_decode_attention(native_ops, bits, tolerance):
    torch.manual_seed(0)
    hq, hkv, d, bs, blocks = 8, 2, 64, 16, 30
    lens = [1, 33, 200, 300]
    tables = torch.stack([torch.randperm(blocks)[:19] for _ in lens])
    cache = PagedKVCache(1, blocks, bs, hkv, d, torch.float32, kv_bits=bits)
    k_all, v_all = torch.randn(blocks * bs, hkv, d), torch.randn(blocks * bs, hkv, d)
    cache.write_reference(0, k_all, v_all, torch.arange(blocks * bs))
    q = torch.randn(len(lens), hq, d)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), len(lens), tables, torch.tensor(lens), None, [])
    got = native_ops.decode_attention(q, 0, meta, cache, d ** -0.5)
    rk, rv = cache.read(0, tables)                                        # dequantized, [B, S, Hkv, D]
    for i, n in enumerate(lens):
        torch.testing.assert_close(got[i], attention_reference(q[i], rk[i, :n], rv[i, :n]), atol=2e-5, rtol=1e-4)
        slots = (tables[i].repeat_interleave(bs) * bs + torch.arange(bs).repeat(19))[:n]
        exact = attention_reference(q[i], k_all[slots], v_all[slots])
        rel = (got[i] - exact).norm() / exact.norm()
        assert rel <= tolerance, f"relative error {rel:.4f}"


@pytest.mark.parametrize("bits, ratio", [(8, 1.9), (4, 3.4)])
def test_capacity_at_equal_budget(bits, ratio):
    for d in (64, 128):
        fp16 = PagedKVCache.bytes_per_token(30, 3, d, torch.float16)
        q = PagedKVCache.bytes_per_token(30, 3, d, torch.float16, kv_bits=bits)
        assert fp16 / q >= ratio
