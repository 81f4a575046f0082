"""wtype 3, "bf16 pairs" (vdpbf16ps): bf16 weights x bf16-rounded activations, fp32 sums.

Tolerances: against `x.bfloat16().float() @ w.float().T` both sides hold the same bf16 inputs and
every product of two bf16 values is exact in fp32, so they differ only by fp32 summation order
(measured <= 1e-5 sqrt(K) up to K = 4864): atol 1e-4 sqrt(K), rtol 1e-5, as the fp32 kernels'
test. Against the plain fp32 product the activations' bf16 rounding (8-bit significand: relative
error <= 2^-8 per element, ~1.6e-3 rms, random signs) adds an error of about 1.6e-3 sqrt(K) per
output for unit-variance inputs (measured max 0.008 sqrt(K)): atol 2^-5 sqrt(K), and a relative
error of the whole product (measured 1.65e-3) under 2^-8.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from quantserve import kernels
from quantserve.kernels import bf16
from quantserve.kernels.fused import DecodeBatch, LayerWeights, LinearWeights


def bf16_lib() -> ctypes.CDLL | None:
    if not kernels.runs_here("avx512"):
        return None
    lib = kernels.load("avx512")
    return lib if bf16.available(lib) else None


LIB = bf16_lib()
needs_bf16 = pytest.mark.skipif(LIB is None, reason="no AVX512-BF16 here (this CPU lacks avx512_bf16 or the "
                                                    "avx512 build cannot be built): wtype 3 does not run")


def test_pack_round_trip_and_layout():
    w = torch.randn(37, 10)
    p = bf16.pack_pairs(w)
    assert p.shape == (3, 5, 16, 2) and p.dtype == torch.bfloat16
    assert p[2, 3, 4, 1] == w[36, 7].bfloat16() and p[2, 0, 5:].abs().sum() == 0     # rows past N are zero
    ids = torch.tensor([36, 0, 17, 17, 5])
    assert torch.equal(bf16.embedding_rows(p, ids), w.bfloat16()[ids])
    assert torch.equal(bf16.embedding_rows(p, torch.arange(37)), w.bfloat16())
    with pytest.raises(ValueError, match="even"):
        bf16.pack_pairs(torch.randn(16, 7))


def test_only_the_avx512_build_has_it():
    for isa in kernels.ISAS:
        lib = kernels.load(isa) if kernels.runs_here(isa) else None
        if lib is not None:
            assert lib.qs_has_bf16_dot() == (isa == "avx512")
            assert bf16.available(lib) == (isa == "avx512" and "avx512_bf16" in kernels.cpu_flags())
            if isa != "avx512":             # wtype 3 in a build without it: NaN, never a wrong number
                packed = bf16.pack_pairs(torch.randn(20, 32))
                assert bf16.linear(lib, torch.randn(3, 32), packed, 20, None).isnan().all()
    assert not bf16.available(None)


@needs_bf16
@pytest.mark.parametrize("m", [1, 2, 7, 12, 13, 33])
@pytest.mark.parametrize("n, k", [(64, 32), (100, 72), (1000, 576), (333, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_bf16_rounded_reference(m, n, k, with_bias):
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    got = bf16.linear(LIB, x, bf16.pack_pairs(w), n, b)
    ref = x.bfloat16().float() @ w.bfloat16().float().t() + (b if with_bias else 0)
    torch.testing.assert_close(got, ref, atol=1e-4 * k ** 0.5, rtol=1e-5)
    exact = x @ w.bfloat16().float().t() + (b if with_bias else 0)          # fp32 activations
    torch.testing.assert_close(got, exact, atol=2 ** -5 * k ** 0.5, rtol=0)
    assert (got - exact).norm() <= 2 ** -8 * exact.norm()


@needs_bf16
@pytest.mark.parametrize("k", [320, 576, 1536, 4864])
def test_rows_do_not_depend_on_batch_or_threads(k):
    n = 200                                     # 13 panels: an odd one out and a partial one
    rows = 60                                   # K = 4864: past the first block of 48 rows
    x, packed, b = torch.randn(rows, k), bf16.pack_pairs(torch.randn(n, k)), torch.randn(n)
    alone = torch.cat([bf16.linear(LIB, x[i:i + 1].contiguous(), packed, n, b) for i in range(rows)])
    for m in range(1, rows + 1):
        assert torch.equal(bf16.linear(LIB, x[:m].contiguous(), packed, n, b), alone[:m]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bf16.linear(LIB, x[:23].contiguous(), packed, n, b), alone[:23])
        assert torch.equal(bf16.linear(LIB, x[:1].contiguous(), packed, n, b), alone[:1])
    finally:
        torch.set_num_threads(threads)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def step_by_kernels(lib, w: dict, x: torch.Tensor, d: dict, k_cache, v_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of qs_decode_layers, kernel by kernel, wtype 3: (output, residual)."""
    T, H, D, hq, hkv, inter = x.shape[0], d["H"], d["D"], d["Hq"], d["Hkv"], d["I"]
    qd, kvd = hq * D, hkv * D

    def lin(a: torch.Tensor, name: str, n: int) -> torch.Tensor:
        return bf16.linear(lib, a, w[name], n, w.get(name + "_bias"))

    residual = x.clone()
    h = torch.empty_like(x)
    lib.qs_add_rmsnorm(x.data_ptr(), None, w["attn_norm"].data_ptr(), 1e-6, h.data_ptr(), T, H)
    qkv = lin(h, "qkv", qd + 2 * kvd)
    lib.qs_rope(qkv.data_ptr(), T, qkv.shape[1], hq + hkv, D, D, d["positions"].data_ptr(), d["cos"].data_ptr(),
                d["sin"].data_ptr())
    for cache, off in ((k_cache, qd), (v_cache, qd + kvd)):
        lib.qs_kv_write(qkv[:, off:].data_ptr(), qkv.shape[1], T, kvd, d["slots"].data_ptr(), cache.data_ptr(), 0)
    attn = torch.empty(T, qd)
    lib.qs_decode_attention(qkv.data_ptr(), qkv.shape[1], k_cache.data_ptr(), v_cache.data_ptr(), 0,
                            d["tables"].data_ptr(), d["lens"].data_ptr(), T, hq, hkv, D, k_cache.shape[1],
                            d["tables"].shape[1], D ** -0.5, attn.data_ptr(), torch.get_num_threads())
    o = lin(attn, "o", H)
    lib.qs_add_rmsnorm(o.data_ptr(), residual.data_ptr(), w["mlp_norm"].data_ptr(), 1e-6, h.data_ptr(), T, H)
    gu = lin(h, "gate_up", 2 * inter)
    act = torch.empty(T, inter)
    lib.qs_silu_mul(gu.data_ptr(), act.data_ptr(), T, inter)
    return lin(act, "down", H), residual


@needs_bf16
def test_the_fused_decode_step_runs_bf16_pairs():
    """qs_decode_layers with wtype 3 gives the numbers of its kernels called one by one."""
    H, D, hq, hkv, inter, bs, blocks = 64, 32, 4, 2, 96, 16, 12
    lens = torch.tensor([5, 17, 33])
    T = len(lens)
    tables = torch.stack([torch.randperm(blocks)[:3] for _ in range(T)])
    d = dict(H=H, D=D, Hq=hq, Hkv=hkv, I=inter, positions=lens - 1, lens=lens, tables=tables,
             slots=torch.stack([tables[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens.tolist())]),
             cos=torch.randn(64, D), sin=torch.randn(64, D))
    shapes = dict(qkv=(hq + 2 * hkv) * D, o=H, gate_up=2 * inter, down=H)
    ins = dict(qkv=H, o=hq * D, gate_up=H, down=inter)
    w = {name: bf16.pack_pairs(torch.randn(n, ins[name]) / ins[name] ** 0.5) for name, n in shapes.items()}
    w.update(qkv_bias=torch.randn(shapes["qkv"]), attn_norm=torch.rand(H) + 0.5, mlp_norm=torch.rand(H) + 0.5)
    k_cache, v_cache, x = torch.randn(1, blocks, bs, hkv, D), torch.randn(1, blocks, bs, hkv, D), torch.randn(T, H)
    kc, vc = k_cache[0].clone(), v_cache[0].clone()
    expected, expected_res = step_by_kernels(LIB, w, x, d, kc, vc)

    layer = LayerWeights(*[LinearWeights(w[name].data_ptr(), None, None, 0, 0) for name in shapes],
                         ptr(w["qkv_bias"]), None, ptr(w["attn_norm"]), ptr(w["mlp_norm"]), None, None, 1)
    batch = DecodeBatch(T=T, H=H, Hq=hq, Hkv=hkv, D=D, R=D, I=inter, wtype=bf16.W_PAIRS, ctype=0, block_size=bs,
                        max_blocks=tables.shape[1], nthreads=torch.get_num_threads(), eps=1e-6, scale=D ** -0.5,
                        positions=ptr(d["positions"]), slots=ptr(d["slots"]), block_tables=ptr(tables),
                        context_lens=ptr(lens), cos=ptr(d["cos"]), sin=ptr(d["sin"]), k_cache=ptr(k_cache),
                        v_cache=ptr(v_cache), layer_stride=k_cache[0].numel())
    out, residual = x.clone(), torch.empty_like(x)
    LIB.qs_decode_layers(ctypes.byref(layer), 1, ctypes.byref(batch), out.data_ptr(), residual.data_ptr())
    assert torch.equal(out, expected) and torch.equal(residual, expected_res)
    assert torch.equal(k_cache[0], kc) and torch.equal(v_cache[0], vc)


def bf16_engine(model_dir, monkeypatch, dot: bool):
    """A bfloat16 model on the avx512 ops, its bf16 linears on vdpbf16ps (dot) or on the
    float32-activation kernels."""
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.kernels.native import NativeOps
    from quantserve.models import loader

    monkeypatch.setattr(loader, "ops_for", lambda *args: NativeOps(LIB, "avx512", bf16_dot=dot))
    return Engine(model_dir, EngineConfig(dtype="bfloat16", cache_max_tokens=2048, max_prefill_token_num=16),
                  progress=False)


def decode(engine, prompts: list[list[int]], together: bool) -> list:
    from quantserve.config import SamplingParams

    outs = []
    for group in [prompts] if together else [[p] for p in prompts]:
        reqs = [engine.add_request(f"r{len(outs)}-{i}", p, SamplingParams(max_new_tokens=10, logprobs=3))
                for i, p in enumerate(group)]
        while engine.has_work:
            engine.step()
        outs += [(r.output_token_ids, [lp.logprob for lp in r.output_logprobs]) for r in reqs]
    return outs


@needs_bf16
def test_a_bf16_model_runs_on_pairs_batch_invariant_and_close_to_fp32_activations(tiny_dirs, monkeypatch):
    """Every linear (and the tied head) holds pairs; a request gives the same tokens and
    log-probabilities alone or batched (chunked prefill and the fused decode step included);
    log-probabilities stay within 0.05 nats of the float32-activation path (bf16 rounding of
    activations: ~2^-8 relative per layer input; measured at most 0.001 on this model)."""
    engine = bf16_engine(tiny_dirs["qwen2"], monkeypatch, dot=True)
    model = engine.model
    assert model.fused is not None and model.fused.wtype == bf16.W_PAIRS
    assert all(m.wtype == bf16.W_PAIRS for m in (model.lm_head, model.layers[1].mlp.down))
    prompts = [list(range(5 + i, 40 + 3 * i)) for i in range(3)]
    alone, batched = decode(engine, prompts, False), decode(engine, prompts, True)
    assert alone == batched
    reference = decode(bf16_engine(tiny_dirs["qwen2"], monkeypatch, dot=False), prompts, False)
    for (tokens, got), (ref_tokens, want) in zip(alone, reference):
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        assert same > 0 and max(abs(a - b) for a, b in zip(got[:same + 1], want[:same + 1])) < 0.05
