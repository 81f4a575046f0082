"""Static KV cache quantization (seed 001): `lite calibrate` statistics, `lite kv_qparams`
parameters switched on in a model directory, and the engine storing K / V with them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from quantserve.config import EngineConfig
from quantserve.kvcache import quant
from quantserve.kvcache.paged import PagedKVCache


def quantserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantserve.cli.main", *args], capture_output=True, text=True,
                          timeout=600, input="")


def test_static_parameters_follow_the_calibrated_range():
    lo, hi = torch.tensor([-1.0, -0.5, 0.25]), torch.tensor([3.0, 0.5, 1.0])
    scale, zero = quant.static_qparams(lo, hi, 8)
    assert torch.all(scale.float() >= torch.tensor([4 / 255, 1 / 255, 1 / 255]))       # rounded up: no overflow
    assert torch.allclose(scale.float(), torch.tensor([4 / 255, 1 / 255, 1 / 255]), rtol=1e-3)
    assert zero.tolist() == [64, 127, 0]          # the code of 0 (a range above 0 starts at it)
    scale, zero = quant.static_qparams(lo, hi, 4, symmetric=True)
    assert torch.allclose(scale.float(), torch.tensor([3 / 7, 0.5 / 7, 1 / 7]), rtol=1e-3) and zero.tolist() == [8] * 3


@pytest.mark.parametrize("bits", [8, 4])
def test_native_static_write_equals_reference_and_saturates(native_ops, bits):
    torch.manual_seed(2)
    hkv, d, layers = 3, 64, 2
    cache, expected = (PagedKVCache(layers, 10, 16, hkv, d, torch.float32, kv_bits=bits) for _ in range(2))
    params = {}
    for which in ("k", "v"):
        g = quant.groups_for(which, bits)
        params[f"{which}_scale"], params[f"{which}_zero"] = quant.static_qparams(
            -torch.rand(layers, hkv, g) * 2, torch.rand(layers, hkv, g) * 2, bits)
    for c in (cache, expected):
        c.set_static(params)
    k, v = (torch.randn(9, 2 * hkv * d)[:, :hkv * d].view(9, hkv, d) * 3 for _ in range(2))   # past the range too
    slots = torch.tensor([0, 5, 16, 17, 40, 63, 100, 150, 159])
    native_ops.kv_write(cache, 1, k, v, slots)
    expected.write_reference(1, k, v, slots)
    for which in ("k", "v"):
        assert all(torch.equal(a, b) for a, b in zip(cache.parts(which, 1), expected.parts(which, 1)))
    data, scale, zero = (p.view(-1, *p.shape[2:]) for p in cache.parts("k", 1))
    static_scale = params["k_scale"][1] if bits == 4 else params["k_scale"][1].squeeze(-1)
    assert torch.equal(scale[slots], static_scale.expand(9, *static_scale.shape))       # every token: the head's
    codes = quant.unpack_int4(data[slots]) if bits == 4 else data[slots]
    assert codes.max() == 2 ** bits - 1 and codes.min() == 0                              # saturated, not wrapped


@pytest.fixture(scope="module")
def calibrated(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("static_kv")
    model = shutil.copytree(tiny_chat_model, root / "model")
    out = quantserve("lite", "calibrate", "--model", str(model), "--calib_dataset", "wikitext2", "--calib_samples",
                     "4", "--calib_seqlen", "64", "--work_dir", str(root / "quant_output"))
    assert out.returncode == 0, out.stderr
    return model, root / "quant_output"


def test_calibrate_keeps_kv_ranges_and_linear_input_statistics(calibrated):
    model, stats = calibrated
    about = json.loads((stats / "calibration.json").read_text())
    assert (about["tokens"], about["dataset"], about["samples"]) == (256, "wikitext2", 4)
    keys = load_file(str(stats / "key_stats.safetensors"))
    layers, heads, dim = about["layers"], about["kv_heads"], about["head_dim"]
    assert keys["layers.0.min"].shape == (heads, dim) and f"layers.{layers - 1}.rot_max" in keys
    for i in range(layers):
        assert torch.all(keys[f"layers.{i}.min"] <= keys[f"layers.{i}.max"])
        assert torch.equal(keys[f"layers.{i}.absmax"], torch.maximum(keys[f"layers.{i}.min"].abs(),
                                                                     keys[f"layers.{i}.max"]))
    inputs = load_file(str(stats / "inputs_stats.safetensors"))
    qkv = {s: inputs[f"layers.0.attn.qkv.{s}"] for s in ("min", "max", "mean", "absmax", "absmean")}
    assert qkv["min"].shape == (json.loads((model / "config.json").read_text())["hidden_size"],)
    assert torch.all(qkv["min"] <= qkv["mean"]) and torch.all(qkv["mean"] <= qkv["max"])
    assert torch.all(qkv["absmean"] <= qkv["absmax"]) and len({k.rsplit(".", 1)[0] for k in inputs}) == 4 * layers


def test_kv_qparams_switches_static_kv_on_and_the_cache_stores_it(calibrated):
    from test_parity import engine_logits

    from quantserve.engine.engine import Engine

    model, stats = calibrated
    out = quantserve("lite", "kv_qparams", "--work_dir", str(stats), "--turbomind_dir", str(model), "--kv_sym",
                     "False", "--num_tp", "1")
    assert out.returncode == 0, out.stderr
    assert "quant_policy = 8" in (model / "config.ini").read_text()
    config = dict(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=4)
    static = Engine(model, EngineConfig(**config), progress=False)
    explicit = Engine(model, EngineConfig(**config, quant_policy=8), progress=False)
    plain = Engine(model, EngineConfig(**config, quant_policy=0), progress=False)       # the flag wins
    assert (static.kv_cache_dtype, explicit.kv_cache_dtype, plain.kv_cache_dtype) == ("int8, static",
                                                                                      "int8, static", "float32")
    prompt = list(range(3, 60))
    reference = engine_logits(plain, prompt, 0)[0]
    got = engine_logits(static, prompt, 0)[0]
    assert float((got - reference).norm() / reference.norm()) < 0.02
    params = load_file(str(model / "kv_qparams.safetensors"))
    stored = static.cache.k_scale[0].view(-1, static.args.num_kv_heads)[:len(prompt)]        # layer 0, slot order
    assert torch.equal(stored, params["k_scale.8"][0].squeeze(-1).expand_as(stored))


def test_static_int4_runs_and_the_fused_decode_matches_layer_by_layer(calibrated, monkeypatch):
    from test_engine import run

    from quantserve.config import SamplingParams
    from quantserve.engine.engine import Engine

    model, _ = calibrated
    assert (model / "kv_qparams.safetensors").is_file()
    params = SamplingParams(max_new_tokens=12)
    fused = Engine(model, EngineConfig(dtype="bfloat16", quant_policy=4, cache_max_tokens=512), progress=False)
    assert fused.kv_cache_dtype == "int4, static" and fused.model.fused is not None
    layered = Engine(model, EngineConfig(dtype="bfloat16", quant_policy=4, cache_max_tokens=512), progress=False)
    layered.model.fused = None
    prompts = [list(range(3, 30)), list(range(10, 50))]
    assert run(fused, prompts, params) == run(layered, prompts, params)


def test_kv_qparams_errors_are_one_line(calibrated, tmp_path):
    model, stats = calibrated
    for args, says in ((["--work_dir", str(stats), "--turbomind_dir", str(model), "--num_tp", "2"], "--num-tp 2"),
                       (["--work_dir", str(tmp_path), "--turbomind_dir", str(model)], "lite calibrate"),
                       (["--work_dir", str(stats), "--turbomind_dir", str(tmp_path)], "no config.json")):
        out = quantserve("lite", "kv_qparams", *args)
        assert out.returncode == 1 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    damaged = shutil.copytree(stats, tmp_path / "damaged")
    (damaged / "key_stats.safetensors").write_bytes(b"\x10" * 50)
    out = quantserve("lite", "kv_qparams", "--work_dir", str(damaged), "--turbomind_dir", str(model))
    assert out.returncode == 1 and "run `quantserve lite calibrate` again" in out.stderr
    from safetensors.torch import save_file

    from quantserve.engine.engine import Engine
    from quantserve.models.workspace import WorkspaceError

    other = shutil.copytree(model, tmp_path / "other")
    params = load_file(str(model / "kv_qparams.safetensors"))
    save_file({k: torch.cat([t, t]) for k, t in params.items()}, str(other / "kv_qparams.safetensors"))  # 2x layers
    with pytest.raises(WorkspaceError, match="run `quantserve lite kv_qparams` for it"):
        Engine(other, EngineConfig(cache_max_tokens=256, session_len=256), progress=False)
    (other / "kv_qparams.safetensors").write_bytes(b"\x10" * 50)                              # damaged
    with pytest.raises(WorkspaceError, match="run `quantserve lite kv_qparams` again"):
        Engine(other, EngineConfig(cache_max_tokens=256, session_len=256), progress=False)
