"""SmoothQuant W8A8 (`lite smooth_quant`): the migration keeps the float model's function, cuts
the error of int8 activations where a channel is an outlier, and the checkpoint (LMDeploy's
QLinear tensors) loads back on the integer kernels."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantserve.config import ConfigError, EngineConfig
from quantserve.quant.arch import Arch, ScaleGroup
from quantserve.quant.calib import InputStats
from quantserve.quant.primitives import quantize
from quantserve.quant.smooth import SPEC, pack, smooth_group, unpack

ARCH = Arch(linears=("l.{i}.attn.q", "l.{i}.attn.k"),
            scale_groups=(ScaleGroup("l.{i}.norm", ("l.{i}.attn.q", "l.{i}.attn.k")),),
            inputs={"attn.q": "attn.qkv", "attn.k": "attn.qkv"})


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations, as SmoothQuant assumes."""
    scale = x.abs().amax(1, keepdim=True) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def outlier_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    x[:, 3] *= 60                                       # one outlier channel, as LLM activations have
    weights = {"l.0.norm.weight": torch.ones(64), "l.0.attn.q.weight": torch.randn(48, 64, generator=g) * 0.05,
               "l.0.attn.k.weight": torch.randn(32, 64, generator=g) * 0.05}
    stats = {"layers.0.attn.qkv": InputStats(keep=16)}
    stats["layers.0.attn.qkv"].add(x)
    return x, weights, stats


def test_migration_keeps_the_float_function_and_lowers_the_w8a8_error():
    x, weights, stats = outlier_case()
    w = torch.cat([weights["l.0.attn.q.weight"], weights["l.0.attn.k.weight"]])
    reference = x @ w.t()
    smoothed = dict(weights)
    smooth_group(smoothed, ARCH, 0, ARCH.layer_groups(0)[0], stats, alpha=0.5)
    xs = x * smoothed["l.0.norm.weight"]                 # the norm now divides by s
    ws = torch.cat([smoothed["l.0.attn.q.weight"], smoothed["l.0.attn.k.weight"]])
    torch.testing.assert_close(xs @ ws.t(), reference, rtol=1e-4, atol=1e-4)

    def w8a8_error(inputs, weight):
        return float((int8_rows(inputs) @ quantize(weight, SPEC).dequantize().t() - reference).norm() / reference.norm())

    plain, smooth = w8a8_error(x, w), w8a8_error(xs, ws)
    assert smooth < plain / 3, (plain, smooth)


def test_lmdeploy_tensors_round_trip_exactly():
    qw = quantize(torch.randn(40, 96), SPEC)
    tensors = pack(qw)
    assert tensors["weight"].dtype == torch.int8 and tensors["scale"].shape == (40, 1)
    back = unpack(tensors["weight"], tensors["scale"])
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    torch.testing.assert_close(back.scales, qw.scales.half().float())


@pytest.fixture(scope="module")
def smoothed(tiny_chat_model, tmp_path_factory):
    from quantserve import lite

    out = tmp_path_factory.mktemp("sq") / "w8a8"
    summary = lite.smooth_quant(str(tiny_chat_model), str(out), calib_dataset="wikitext2", calib_samples=4,
                                calib_seqlen=64, progress=False)
    assert "SMOOTH_QUANT W8" in summary
    return out


def test_the_checkpoint_loads_on_the_integer_kernels_close_to_float(tiny_chat_model, smoothed):
    from test_parity import engine_logits, small_engine

    config = json.loads((smoothed / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["quant_dtype"]) == ("smooth_quant", "int8")
    tensors = load_file(str(smoothed / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    engine = small_engine(smoothed, quantization="smooth_quant")
    linears = [m for m in engine.model.layers.modules() if hasattr(m, "spec")]
    assert linears and {(m.spec.bits, m.spec.group_size) for m in linears} == {(8, -1)}
    prompt = list(range(3, 40))
    a, b = engine_logits(small_engine(tiny_chat_model), prompt, 0)[0], engine_logits(engine, prompt, 0)[0]
    assert float((b - a).norm() / a.norm()) < 0.03
    assert small_engine(smoothed, quantization="w8a8").weights_bytes == engine.weights_bytes    # it is W8A8


def test_claims_and_settings_are_checked(tiny_chat_model, smoothed, tmp_path):
    from quantserve import lite
    from quantserve.engine.engine import Engine
    from quantserve.quant.primitives import QuantError

    with pytest.raises(ConfigError, match="not smooth_quant"):
        Engine(tiny_chat_model, EngineConfig(quantization="smooth_quant", cache_max_tokens=256, session_len=256),
               progress=False)
    with pytest.raises(ConfigError, match="not awq"):
        Engine(smoothed, EngineConfig(quantization="awq", cache_max_tokens=256, session_len=256), progress=False)
    with pytest.raises(QuantError, match="--calib-samples > 0"):
        lite.smooth_quant(str(tiny_chat_model), str(tmp_path / "x"), calib_samples=0)
