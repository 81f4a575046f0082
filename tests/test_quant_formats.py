"""Packed formats: exact round trips, and a checkpoint read back by an unpacker written here from
the format descriptions alone (plain integer loops, no shared code)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from quantserve.quant.formats import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from quantserve.quant.primitives import QuantError, QuantSpec, check_spec, dequantize, quantize


def weight(n=64, k=256, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, k)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_awq_round_trip_is_exact(group):
    qw = quantize(weight(), QuantSpec(4, group))
    back = unpack_awq(pack_awq(qw), group)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales.half().float())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gptq_round_trip_is_exact(bits, group):
    qw = quantize(weight(), QuantSpec(bits, group), min_zero=1)
    back, g_idx = unpack_gptq(pack_gptq(qw), bits, group)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(g_idx, torch.arange(256) // (256 if group == -1 else group))


def test_quantization_error_is_within_half_a_step():
    w = weight()
    for spec in (QuantSpec(4, 64), QuantSpec(8, 128), QuantSpec(4, 32, symmetric=True), QuantSpec(3, 64)):
        qw = quantize(w, spec)
        err = (qw.dequantize() - w).abs().reshape(64, -1, spec.width(256))
        assert bool((err <= qw.scales.unsqueeze(-1) / 2 + 1e-6).all()), spec


def test_min_zero_one_keeps_nonnegative_groups_exact_enough():
    w = weight().abs()                                    # every group non-negative: zero would be 0
    qw = quantize(w, QuantSpec(4, 64), min_zero=1)
    assert int(qw.zeros.min()) == 1
    assert float((qw.dequantize() - w).abs().max()) <= float(qw.scales.max()) / 2 + 1e-6


def test_group_size_that_does_not_divide_is_explained():
    with pytest.raises(QuantError, match="valid group sizes for this model: 32, 64, -1"):
        check_spec(QuantSpec(4, 128), 576, "q_proj")
    with pytest.raises(QuantError, match="--w-bits 5"):
        check_spec(QuantSpec(5, 64), 576)


# ---- an independent reader, from the format descriptions -----------------------------------

def read_awq(qweight: torch.Tensor, qzeros: torch.Tensor):
    """AutoAWQ GEMM: qweight [K, N/8]; word c of row k holds output columns 8c..8c+7, nibble i
    being column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        rows, cols = words.shape
        out = [[0] * (cols * 8) for _ in range(rows)]
        for r in range(rows):
            for c in range(cols):
                word = int(words[r, c]) & 0xFFFFFFFF
                for i in range(8):
                    out[r][8 * c + order[i]] = (word >> (4 * i)) & 0xF
        return torch.tensor(out)

    return unpack(qweight).t(), unpack(qzeros).t()          # codes [N, K], zeros [N, G]


def test_lite_rtn_checkpoint_read_by_an_independent_unpacker(tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    cmd = [sys.executable, "-m", "quantserve.cli.main", "lite", "auto_awq", str(tiny_llama), "--calib-samples", "0",
           "--w-group-size", "32", "--work-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}
    packed = load_file(str(out / "model.safetensors"))
    source = load_file(str(next(tiny_llama.glob("*.safetensors"))))
    name = "model.layers.1.mlp.down_proj"
    codes, zeros = read_awq(packed[f"{name}.qweight"], packed[f"{name}.qzeros"])
    expected = quantize(source[f"{name}.weight"].float(), QuantSpec(4, 32))
    assert torch.equal(codes.to(torch.uint8), expected.q) and torch.equal(zeros.to(torch.uint8), expected.zeros)
    rebuilt = dequantize(codes, packed[f"{name}.scales"].float().t(), zeros, QuantSpec(4, 32))
    assert float((rebuilt - source[f"{name}.weight"]).abs().max()) < 0.02
    assert f"{name}.weight" not in packed and "model.embed_tokens.weight" in packed


def test_quantized_checkpoint_loads_and_runs_close_to_float(tiny_llama, tmp_path):
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.quant.run import LiteJob, run

    for method, bits in (("rtn", 4), ("rtn", 8)):
        out = tmp_path / f"{method}{bits}"
        run(LiteJob(str(tiny_llama), str(out), method, QuantSpec(bits, 32), progress=False))
        engine = Engine(out, EngineConfig(dtype="float32", cache_max_tokens=1024), progress=False)
        assert engine.model.layers[0].attn.qkv.spec == QuantSpec(bits, 32)
        ref = Engine(tiny_llama, EngineConfig(dtype="float32", cache_max_tokens=1024), progress=False)
        q_logits, f_logits = last_logits(engine), last_logits(ref)
        rel = float((q_logits - f_logits).norm() / f_logits.norm())
        assert rel < (0.2 if bits == 4 else 0.01), (bits, rel)


def last_logits(engine) -> torch.Tensor:
    from quantserve.config import SamplingParams

    engine.add_request("r", list(range(3, 40)), SamplingParams(max_new_tokens=1))
    out = engine.scheduler.schedule()
    logits, _ = engine.runner.compute_logits(out)
    engine.abort("r")
    return logits[0]


def test_bad_lite_input_is_one_line(tiny_llama, tmp_path):
    def lite(*args):
        return subprocess.run([sys.executable, "-m", "quantserve.cli.main", "lite", *args], capture_output=True,
                              text=True, timeout=300)

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(["auto_awq", str(tiny_llama), "--w-bits", "5", "--calib-samples", "0"], "--w-bits 5"),
             (["auto_awq", str(tiny_llama), "--w-group-size", "48", "--calib-samples", "0"], "--w-group-size 48"),
             (["auto_awq", str(tiny_llama), "--calib-samples", "0", "--w-group-size", "32", "--work-dir",
               str(blocker / "out")], "--work-dir"),
             (["auto_awq", str(tmp_path / "missing")], "config.json")]
    for args, needle in cases:
        done = lite(*args)
        assert done.returncode == 1 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    quantized = tmp_path / "q"
    assert lite("rtn", str(tiny_llama), "--w-group-size", "32", "--work-dir", str(quantized)).returncode == 0
    again = lite("rtn", str(quantized), "--w-group-size", "32", "--work-dir", str(tmp_path / "q2"))
    assert again.returncode == 1 and "already quantized" in again.stderr
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())      # no partial directories left
