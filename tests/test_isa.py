"""The kernel backend is chosen once (avx512 where the CPU has VNNI, else avx2, else torch) and
can be forced; integer-weight models give bit-identical numbers on avx512 and avx2, since
integer sums are exact whichever instructions make them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from quantserve import kernels
from quantserve.kernels.native import NativeOps
from quantserve.models.ops import TorchOps, ops_for
from quantserve.quant.primitives import QuantSpec, quantize

needs_avx512 = pytest.mark.skipif(not kernels.runs_here("avx512"),
                                  reason="this CPU has no AVX-512 F/BW/VL + VNNI: only the avx2 backend runs here")


def qlinear(isa: str, x: torch.Tensor, packed: tuple, n: int, bits: int, group: int) -> torch.Tensor:
    """The integer linear of one build: x [M, K] -> [M, n]."""
    return NativeOps(kernels.load(isa), isa).linear_int(x, packed, n, bits, group, None)


def test_the_backend_is_the_widest_this_cpu_runs():
    expected = "avx512" if kernels.runs_here("avx512") else "avx2" if kernels.runs_here("avx2") else "torch"
    if os.environ.get("QUANTSERVE_ISA") or os.environ.get("QUANTSERVE_DISABLE_KERNELS"):
        pytest.skip("the backend is forced by the environment")
    assert kernels.backend() == expected and kernels.describe().startswith(expected)


def run_forced(isa: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTSERVE_ISA": isa}
    env.pop("QUANTSERVE_DISABLE_KERNELS", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("isa", ["avx2", "torch"])
def test_a_forced_backend_is_used(isa):
    if not kernels.runs_here(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    done = run_forced(isa, "from quantserve import kernels; print(kernels.backend(), kernels.cpu() is None)")
    assert done.stdout.split() == [isa, str(isa == "torch")]


def test_a_backend_the_cpu_lacks_or_does_not_know_is_a_clear_error():
    wanted = "avx512" if not kernels.runs_here("avx512") else "sse9"
    done = run_forced(wanted, "from quantserve import kernels; kernels.backend()")
    assert done.returncode != 0 and f"QUANTSERVE_ISA={wanted}:" in done.stderr.splitlines()[-1]


@needs_avx512
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_integer_linears_are_bit_identical_on_avx512_and_avx2(bits, m):
    torch.manual_seed(bits + m)
    n, k, group = 136, 512, 64
    qw = quantize(torch.randn(n, k), QuantSpec(bits, group))
    packed = kernels.pack_quantized(qw.q, qw.scales, qw.offsets(), bits)
    x = torch.randn(m, k) * torch.rand(k) * 4                      # uneven channels: large int8 codes
    wide, narrow = (qlinear(isa, x, packed, n, bits, group) for isa in ("avx512", "avx2"))
    assert torch.equal(wide, narrow) and wide.abs().sum() > 0


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 7, 16, 33])
def test_float_linears_are_bit_identical_on_avx512_and_avx2(dtype, m):
    """zmm tiles on avx512, ymm on avx2: each output is the same FMA chain over k either way."""
    torch.manual_seed(m)
    n, k = 200, 576                                                  # 200: a last panel of 8 rows
    weight, x, bias = torch.randn(n, k).to(dtype), torch.randn(m, k), torch.randn(n)
    wide, narrow = (NativeOps(kernels.load(isa), isa, bf16_dot=False) for isa in ("avx512", "avx2"))
    packed, wtype = wide.pack_float(weight)
    for b in (None, bias):
        y = wide.linear(x, packed, wtype, n, b)
        assert torch.equal(y, narrow.linear(x, packed, wtype, n, b)) and y.abs().sum() > 0
        assert torch.equal(y[-1:], wide.linear(x[-1:].contiguous(), packed, wtype, n, b))  # alone = batched


LOGITS = """
import json, sys, torch
from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine
from quantserve import kernels
engine = Engine(sys.argv[1], EngineConfig(dtype="float32", cache_max_tokens=2048, quant_policy=8), progress=False)
assert engine.model.fused is not None
reqs = [engine.add_request(f"r{i}", list(range(5 + i, 40 + 3 * i)), SamplingParams(max_new_tokens=10, logprobs=5))
        for i in range(3)]
while engine.has_work:
    engine.step()
print(json.dumps([kernels.backend(), [[r.output_token_ids, [[lp.logprob, lp.top] for lp in r.output_logprobs]]
                                       for r in reqs]]))
"""


@needs_avx512
def test_an_integer_model_decodes_bit_identically_on_avx512_and_avx2(tiny_llama, tmp_path):
    """Prefill and the fused decode step of a W4 model with an int8 KV cache, batched: the same
    tokens and the same log-probabilities to the last bit on both backends."""
    from quantserve.quant.run import LiteJob, run

    run(LiteJob(str(tiny_llama), str(tmp_path / "q"), "rtn", QuantSpec(4, 32), progress=False))
    results = {}
    for isa in ("avx512", "avx2"):
        done = run_forced(isa, LOGITS.replace("sys.argv[1]", repr(str(tmp_path / "q"))))
        assert done.returncode == 0, done.stderr
        backend, results[isa] = json.loads(done.stdout.splitlines()[-1])
        assert backend == isa
    assert results["avx512"] == results["avx2"] and len(results["avx2"][0][0]) == 10


def test_the_ops_are_chosen_once_at_load_from_the_backend_and_the_shapes():
    """Native ops where the process backend has a library and the model's shapes suit the
    kernels; the torch reference otherwise (and always off the CPU)."""
    native = kernels.cpu() is not None
    fits = ops_for("cpu", 576, 1536, 64, 9, 3, 64)
    assert isinstance(fits, NativeOps if native else TorchOps) and fits.describe().startswith(kernels.backend())
    assert isinstance(ops_for("cpu", 576, 1536, 72, 8, 1, 72), TorchOps)    # head_dim not a multiple of 16
    assert isinstance(ops_for("cpu", 576, 1536, 64, 64, 2, 64), TorchOps)   # 32 query heads per KV head
    assert isinstance(ops_for("meta", 576, 1536, 64, 9, 3, 64), TorchOps)
    assert isinstance(ops_for("cpu", 576, 1536, 64, 9, 3, 24), TorchOps)   # rotary dims not a multiple of 16
