"""qs_prefill_attention (kernels/flash.py) on each native build against the plain-PyTorch reference:
causal_attention over the context read back from a real PagedKVCache (dequantized when quantized)."""
from __future__ import annotations

import pytest
import torch

from quantserve import kernels
from quantserve.kernels.flash import prefill_attention
from quantserve.kvcache.paged import PagedKVCache, causal_attention

BUILDS = ("avx512", "avx2")


def build(isa: str):
    if not kernels.runs_here(isa):
        pytest.skip(f"this CPU lacks the instructions of the {isa} build")
    lib = kernels.load(isa)
    if lib is None:
        pytest.skip(f"the {isa} kernels cannot be built here (no C compiler?)")
    return lib


def filled_cache(context_len: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, kv_bits: int,
                 seed: int) -> tuple[PagedKVCache, torch.Tensor]:
    """A one-layer cache holding random K/V for `context_len` tokens in shuffled, non-contiguous
    blocks (half the pool left unused) -> (cache, the context's block ids in order)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-context_len // block_size)
    cache = PagedKVCache(1, 2 * nblocks + 1, block_size, hkv, d, dtype, kv_bits=kv_bits)
    ids = torch.randperm(2 * nblocks + 1, generator=g)[:nblocks]
    t = torch.arange(context_len)
    k, v = torch.randn(context_len, hkv, d, generator=g), torch.randn(context_len, hkv, d, generator=g)
    cache.write_reference(0, k, v, ids[t // block_size] * block_size + t % block_size)
    return cache, ids


def strided_q(n: int, hq: int, hkv: int, d: int, seed: int) -> torch.Tensor:
    """[N, Hq, D] q as the model has it: the first Hq heads of each row of a fused qkv projection."""
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(seed)) * 2
    return qkv[:, :hq * d].view(n, hq, d)


def run(lib, q: torch.Tensor, cache: PagedKVCache, ids: torch.Tensor, context_len: int) -> torch.Tensor:
    return prefill_attention(lib, q, cache.parts("k", 0), cache.parts("v", 0), ids, context_len, q.shape[2] ** -0.5)


# The kernel reads exactly the stored values (bf16/fp16 widen exactly; int8 dequantizes with the
# reference's own float ops), so float and int8 caches differ from the reference only by fp32
# summation order, exp and the online rescaling: max error seen 5e-6 over these cases and 3
# seeds (outputs ~1), so atol 1e-5. int4 also moves the Hadamard rotation from K/V (reference:
# x @ H) onto q and the output (fwht), another rounding of the same orthogonal map: seen 6e-6,
# atol 3e-5.
TOLERANCE = {0: dict(atol=1e-5, rtol=1e-4), 8: dict(atol=1e-5, rtol=1e-4), 4: dict(atol=3e-5, rtol=1e-4)}

# (N, context_len, Hq, Hkv, D, block_size, cache dtype, kv_bits); no N is a multiple of the
# 64-row query tile, context_len == N means no past
CASES = [
    (100, 100, 4, 4, 64, 16, torch.float32, 0),
    (130, 200, 9, 3, 64, 64, torch.float32, 0),
    (77, 77, 14, 2, 128, 16, torch.float32, 0),
    (65, 300, 7, 1, 128, 16, torch.bfloat16, 0),
    (150, 150, 9, 3, 64, 64, torch.bfloat16, 0),
    (150, 150, 9, 3, 64, 16, torch.float16, 0),
    (33, 161, 14, 2, 64, 64, torch.float16, 0),
    (90, 90, 9, 3, 64, 16, torch.float32, 8),
    (70, 250, 14, 2, 128, 64, torch.float32, 8),
    (90, 90, 9, 3, 64, 16, torch.float32, 4),
    (70, 250, 14, 2, 128, 64, torch.float32, 4),
    (1, 57, 4, 2, 64, 16, torch.float32, 0),
]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("n, context_len, hq, hkv, d, block_size, dtype, kv_bits", CASES)
def test_matches_reference(isa, n, context_len, hq, hkv, d, block_size, dtype, kv_bits):
    lib = build(isa)
    cache, ids = filled_cache(context_len, hkv, d, block_size, dtype, kv_bits, seed=n + context_len)
    q = strided_q(n, hq, hkv, d, seed=hq)
    k, v = cache.read(0, ids)                        # dequantized when quantized, [blocks * block_size, Hkv, D]
    expected = causal_attention(q, k[:context_len].float(), v[:context_len].float(), d ** -0.5)
    torch.testing.assert_close(run(lib, q, cache, ids, context_len), expected, **TOLERANCE[kv_bits])


@pytest.mark.parametrize("dtype, kv_bits", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 8),
                                            (torch.float32, 4)])
def test_builds_agree_to_the_bit(dtype, kv_bits):
    """Every output element is summed in the same order at either vector width (cpu_kernels.c)."""
    libs = [build(isa) for isa in BUILDS]
    cache, ids = filled_cache(230, 2, 64, 16, dtype, kv_bits, seed=3)
    q = strided_q(150, 14, 2, 64, seed=4)
    a, b = (run(lib, q, cache, ids, 230) for lib in libs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("isa", BUILDS)
def test_rows_do_not_depend_on_the_chunk(isa):
    """A row's numbers are the same whether its chunk starts at 0 or after a cached prefix."""
    lib = build(isa)
    cache, ids = filled_cache(200, 3, 64, 16, torch.float32, 0, seed=5)
    q = strided_q(200, 9, 3, 64, seed=6)
    whole = run(lib, q, cache, ids, 200)
    assert torch.equal(run(lib, q[121:], cache, ids, 200), whole[121:])
    assert torch.equal(run(lib, q[:130], cache, ids, 130), whole[:130])


# sliding windows: shorter than a 64-key tile, spanning several, and a chunk that starts past it
WINDOW_CASES = [(100, 100, 9, 3, 64, 16, torch.float32, 0, 13), (130, 300, 4, 2, 64, 64, torch.bfloat16, 0, 100),
                (70, 250, 14, 2, 128, 16, torch.float32, 8, 37), (90, 200, 9, 3, 64, 16, torch.float32, 4, 64)]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("n, context_len, hq, hkv, d, block_size, dtype, kv_bits, window", WINDOW_CASES)
def test_sliding_window_matches_reference(isa, n, context_len, hq, hkv, d, block_size, dtype, kv_bits, window):
    """Each row sees only the last `window` keys up to its position, as the reference masks them."""
    lib = build(isa)
    cache, ids = filled_cache(context_len, hkv, d, block_size, dtype, kv_bits, seed=n + window)
    q = strided_q(n, hq, hkv, d, seed=window)
    k, v = cache.read(0, ids)
    expected = causal_attention(q, k[:context_len].float(), v[:context_len].float(), d ** -0.5, window)
    got = prefill_attention(lib, q, cache.parts("k", 0), cache.parts("v", 0), ids, context_len, d ** -0.5, window)
    torch.testing.assert_close(got, expected, **TOLERANCE[kv_bits])
    assert not torch.allclose(expected, causal_attention(q, k[:context_len].float(), v[:context_len].float(),
                                                         d ** -0.5), atol=1e-3)          # the window mattered
