"""The integer-weight kernel (W4A16 / W8A16) against dequantize-then-matmul, batch invariance,
and the fused decode step on a quantized model."""
from __future__ import annotations

import pytest
import torch

from quantserve import kernels
from quantserve.quant.primitives import QuantSpec, quantize

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="native kernels unavailable")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 16])
def test_quantized_linear_matches_dequantized_matmul(bits, group, m):
    torch.manual_seed(bits * group + m)
    n, k = 200, 512                                  # n not a multiple of the 16-row panel
    qw = quantize(torch.randn(n, k), QuantSpec(bits, group))
    packed = kernels.pack_quantized(qw.q, qw.scales, qw.zeros, bits)
    x, bias = torch.randn(m, k).bfloat16().float(), torch.randn(n)
    y = kernels.linear_quantized(x, packed, n, bits, group, bias)
    ref = (x.bfloat16() @ qw.dequantize().bfloat16().t()).float() + bias     # the bf16 reference
    assert float((y - ref).norm() / ref.norm()) <= 1e-2


def test_quantized_linear_rows_do_not_depend_on_batch():
    torch.manual_seed(0)
    qw = quantize(torch.randn(96, 256), QuantSpec(4, 64))
    packed = kernels.pack_quantized(qw.q, qw.scales, qw.zeros, 4)
    x = torch.randn(16, 256)
    full = kernels.linear_quantized(x, packed, 96, 4, 64, None)
    for i in (0, 5, 15):
        alone = kernels.linear_quantized(x[i:i + 1].contiguous(), packed, 96, 4, 64, None)
        assert torch.equal(alone[0], full[i])


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
