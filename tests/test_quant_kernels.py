"""The integer-weight kernel (4- and 8-bit weights, activations quantized to int8 per 32-block)
against dequantize-then-matmul, batch invariance, the int8 output head, and a packed model
against transformers running the same dequantized weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantserve import kernels
from quantserve.quant.linear import IntPanelLinear
from quantserve.quant.primitives import QuantSpec, quantize

native = pytest.mark.skipif(kernels.cpu() is None, reason="native kernels unavailable")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 16])
def test_quantized_linear_matches_dequantized_matmul(native_ops, bits, group, m):
    torch.manual_seed(bits * group + m)
    n, k = 200, 512                                  # n not a multiple of the 16-row panel
    qw = quantize(torch.randn(n, k), QuantSpec(bits, group))
    packed = kernels.pack_quantized(qw.q, qw.scales, qw.offsets(), bits)
    x, bias = torch.randn(m, k).bfloat16().float(), torch.randn(n)
    y = native_ops.linear_int(x, packed, n, bits, group, bias)
    ref = (x.bfloat16() @ qw.dequantize().bfloat16().t()).float() + bias     # the bf16 reference
    assert float((y - ref).norm() / ref.norm()) <= 1e-2


def test_quantized_linear_rows_do_not_depend_on_batch(native_ops):
    torch.manual_seed(0)
    qw = quantize(torch.randn(96, 256), QuantSpec(4, 64))
    packed = kernels.pack_quantized(qw.q, qw.scales, qw.offsets(), 4)
    x = torch.randn(16, 256)
    full = native_ops.linear_int(x, packed, 96, 4, 64, None)
    for i in (0, 5, 15):
        alone = native_ops.linear_int(x[i:i + 1].contiguous(), packed, 96, 4, 64, None)
        assert torch.equal(alone[0], full[i])


@native
def test_fused_decode_of_a_quantized_model_equals_the_module_path(tiny_llama, tmp_path):
    from quantserve.config import EngineConfig, SamplingParams
    from quantserve.engine.engine import Engine
    from quantserve.quant.run import LiteJob, run

    run(LiteJob(str(tiny_llama), str(tmp_path / "q"), "rtn", QuantSpec(4, 32), progress=False))
    outputs = []
    for fused in (True, False):
        engine = Engine(tmp_path / "q", EngineConfig(dtype="float32", cache_max_tokens=2048), progress=False)
        assert engine.model.fused is not None
        if not fused:
            engine.model.fused = None
        for i in range(3):
            engine.add_request(f"r{i}", list(range(5 + i, 30 + i)), SamplingParams(max_new_tokens=12))
        done = {}
        while engine.has_work:
            for r in engine.step():
                if r.is_finished:
                    done[r.request_id] = r.output_token_ids
        outputs.append(done)
    assert outputs[0] == outputs[1]


@native
def test_a_quantized_model_reads_its_tied_embedding_from_the_int8_head(tiny_dirs, tmp_path):
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.quant.run import LiteJob, run

    run(LiteJob(str(tiny_dirs["qwen2"]), str(tmp_path / "q"), "rtn", QuantSpec(4, 32), progress=False))  # tied
    model = Engine(tmp_path / "q", EngineConfig(dtype="float32", cache_max_tokens=512), progress=False).model
    assert model.lm_head.spec == QuantSpec(8, 64) and isinstance(model.lm_head, IntPanelLinear)
    embed = load_file(str(tmp_path / "q" / "model.safetensors"))["model.embed_tokens.weight"].float()
    ids = torch.tensor([0, 7, 8, 319])                  # first and last rows of 8-row panels
    expected = quantize(embed, QuantSpec(8, 64)).dequantize()[ids]
    assert torch.allclose(model.embed(ids), expected, atol=1e-3 * float(embed.abs().max()))   # float16 scales


@native
def test_a_4_bit_head_holds_half_the_bytes_and_reads_its_tied_embedding(tiny_dirs, tmp_path):
    """--head-bits 4: the head's codes are 4-bit (the tied embedding gathers them from the nibble
    panels) and the logits stay close to the 8-bit head's."""
    from test_parity import engine_logits

    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.quant.run import LiteJob, run

    run(LiteJob(str(tiny_dirs["qwen2"]), str(tmp_path / "q"), "rtn", QuantSpec(4, 32), progress=False))  # tied
    engines = {bits: Engine(tmp_path / "q", EngineConfig(dtype="float32", cache_max_tokens=512, session_len=512,
                                                          head_bits=bits), progress=False) for bits in (8, 4)}
    head8, head4 = (engines[b].model.lm_head for b in (8, 4))
    assert head4.spec.bits == 4 and head8.spec.bits == 8 and head4.spec.group_size == head8.spec.group_size
    assert head4.qcodes.nbytes * 2 == head8.qcodes.nbytes
    embed = load_file(str(tmp_path / "q" / "model.safetensors"))["model.embed_tokens.weight"].float()
    ids = torch.tensor([0, 7, 8, 319])                  # first and last rows of 8-row panels
    expected = quantize(embed, head4.spec).dequantize()[ids]
    assert torch.allclose(engines[4].model.embed(ids), expected, atol=1e-3 * float(embed.abs().max()))
    prompt = list(range(3, 30))
    l8, l4 = (engine_logits(engines[b], prompt, 4) for b in (8, 4))
    assert float((l4 - l8).norm() / l8.norm()) <= 0.15 and not torch.equal(l4, l8)


@native
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_model_logits_match_transformers_on_the_dequantized_weights(tiny_dirs, tmp_path, family):
    """The same codes, once packed for the kernel and once written as float weights (--fake-quant)
    for transformers, which scores the engine's own greedy continuation: prefill and fused-decode
    logits agree to the int8 rounding of the activations and of the output head."""
    from test_parity import engine_logits, small_engine
    from transformers import AutoModelForCausalLM

    from quantserve.quant.run import LiteJob, run

    spec, prompt = QuantSpec(4, 32), list(range(3, 40))
    run(LiteJob(str(tiny_dirs[family]), str(tmp_path / "packed"), "rtn", spec, progress=False))
    run(LiteJob(str(tiny_dirs[family]), str(tmp_path / "float"), "rtn", spec, progress=False, fake_quant=True))
    engine = small_engine(tmp_path / "packed")
    assert engine.model.fused is not None and isinstance(engine.model.lm_head, IntPanelLinear)
    got = engine_logits(engine, prompt, 16)                                        # [17, V]
    ids = torch.tensor([prompt + got.argmax(-1)[:-1].tolist()])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval()(ids).logits[0, len(prompt) - 1:]
    assert float((got - expected).norm() / expected.norm()) <= 2e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
