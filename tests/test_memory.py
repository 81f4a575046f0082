"""`quantserve mem` reproduces the memory arithmetic of the tutorials in ../shared/seeds."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantserve.cli.main import main


def mem(capsys, *args) -> dict:
    assert main(["mem", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# seed 000 / 002 §6.3.1: InternLM2.5-7B bf16 on a 24 GB card: 14 GB weights + 8 GB KV + 1 GB other = 23 GB
def test_7b_bf16_default(capsys):
    r = mem(capsys, "--params", "7B", "--dtype", "bf16", "--device-memory", "24GB")
    assert r["weights_gb"] == pytest.approx(14, abs=0.1)
    assert r["kv_cache_gb"] == pytest.approx(8, abs=0.1)
    assert r["total_gb"] == pytest.approx(23, abs=0.1)


# seed 000 / 002 §6.3.2: --cache-max-entry-count 0.4 -> 14 + 4 + 1 = 19 GB
def test_7b_cache_04(capsys):
    r = mem(capsys, "--params", "7B", "--device-memory", "24GB", "--cache-max-entry-count", "0.4")
    assert r["kv_cache_gb"] == pytest.approx(4, abs=0.1) and r["total_gb"] == pytest.approx(19, abs=0.1)


# seed 002 §6.3.1: the same model on a 40 GB card: 14 + 20.8 = 34.8 GB (+ other)
def test_7b_on_40gb(capsys):
    r = mem(capsys, "--params", "7B", "--device-memory", "40GB")
    assert r["kv_cache_gb"] == pytest.approx(20.8, abs=0.1)
    assert r["weights_gb"] + r["kv_cache_gb"] == pytest.approx(34.8, abs=0.1)


# seed 002 §6.3.3: --quant-policy 4 with 0.4 keeps 19 GB, but the same 4 GB hold 4x the tokens of bf16
def test_kv_int4_same_bytes_more_tokens(capsys):
    shape = ["--params", "7B", "--layers", "32", "--hidden-size", "4096", "--heads", "32", "--kv-heads", "8"]
    bf16 = mem(capsys, *shape, "--device-memory", "24GB", "--cache-max-entry-count", "0.4")
    int4 = mem(capsys, *shape, "--device-memory", "24GB", "--cache-max-entry-count", "0.4", "--quant-policy", "4")
    assert int4["total_gb"] == pytest.approx(19, abs=0.1) and int4["kv_cache_gb"] == bf16["kv_cache_gb"]
    assert int4["kv_tokens"] / bf16["kv_tokens"] == pytest.approx(512 / 137, rel=1e-3)  # 3.74x with scales/zeros


# seed 002 §6.3.4: W4A16 -> 3.5 GB weights, KV (24 - 3.5) * 0.8 = 16.4 GB, total 20.9 GB. The
# tutorial counts 4 bits per weight and nothing for the group scales: that is --w-group-size 0.
def test_w4a16(capsys):
    r = mem(capsys, "--params", "7B", "--w-bits", "4", "--w-group-size", "0", "--device-memory", "24GB")
    assert r["weights_gb"] == pytest.approx(3.5, abs=0.1)
    assert r["kv_cache_gb"] == pytest.approx(16.4, abs=0.1)
    assert r["total_gb"] == pytest.approx(20.9, abs=0.1)
    grouped = mem(capsys, "--params", "7B", "--w-bits", "4", "--device-memory", "24GB")
    assert grouped["weights_gb"] == pytest.approx(3.5 + 7e9 / 128 * 2.5 / 1e9, abs=1e-3)   # + fp16 scale, 4-bit zero


# seed 002 §6.3.5: W4A16 + 0.4 + int4 KV: 3.5 + 8.2 + 1.8 (measured other) = 13.5 GB
def test_w4a16_kv_int4_04(capsys):
    r = mem(capsys, "--params", "7B", "--w-bits", "4", "--w-group-size", "0", "--device-memory", "24GB",
            "--cache-max-entry-count", "0.4", "--quant-policy", "4", "--other-gb", "1.8")
    assert r["kv_cache_gb"] == pytest.approx(8.2, abs=0.1) and r["total_gb"] == pytest.approx(13.5, abs=0.1)


# seed 002 §6.3.6: InternVL2-26B W4 on 24 GB: ViT 6B fp16 12 GB + LLM 20B int4 10 GB + KV 0.2 + 1.6 = 23.8
def test_internvl2_26b_w4(capsys):
    r = mem(capsys, "--params", "20B", "--vision-params", "6B", "--dtype", "fp16", "--w-bits", "4",
            "--w-group-size", "0", "--device-memory", "24GB", "--cache-max-entry-count", "0.1",
            "--quant-policy", "4", "--other-gb", "1.6")
    assert r["vision_gb"] == pytest.approx(12, abs=0.1) and r["weights_gb"] == pytest.approx(10, abs=0.1)
    assert r["kv_cache_gb"] == pytest.approx(0.2, abs=0.1) and r["total_gb"] == pytest.approx(23.8, abs=0.1)


# ... and unquantized on an 80 GB A100: 12 + 40 + 22.4 = 74.4 GB before "other"
def test_internvl2_26b_fp16_80gb(capsys):
    r = mem(capsys, "--params", "20B", "--vision-params", "6B", "--dtype", "fp16", "--device-memory", "80GB",
            "--other-gb", "0")
    assert r["weights_gb"] == pytest.approx(40, abs=0.1) and r["kv_cache_gb"] == pytest.approx(22.4, abs=0.1)
    assert r["total_gb"] == pytest.approx(74.4, abs=0.1)


# seed 004: fp32 1B = 4 bytes * 1e9 / 1024^3 = 3.725 "GB" (GiB); the table shows both units
def test_fp32_1b_in_gib(capsys):
    r = mem(capsys, "--params", "1B", "--dtype", "fp32", "--device-memory", "24GB")
    assert r["weights_gb"] * 1e9 / 2**30 == pytest.approx(3.725, abs=0.001)
    assert main(["mem", "--params", "1B", "--dtype", "fp32", "--device-memory", "24GB"]) == 0
    assert "3.725" in capsys.readouterr().out


# seed 004 training: gradients 4P (fp32) / 2P (fp16); Adam 12P; 8-bit Adam (4+1+1)P
def test_training_full_and_lora(capsys):
    shape = ["--params", "7B", "--layers", "32", "--hidden-size", "4096", "--heads", "32"]
    full = mem(capsys, *shape, "--train", "full", "--dtype", "fp32")
    assert full["weights_gb"] == pytest.approx(28) and full["gradients_gb"] == pytest.approx(28)
    assert full["optimizer_gb"] == pytest.approx(84)
    half = mem(capsys, *shape, "--train", "full", "--dtype", "bf16", "--optimizer", "adam8bit")
    assert half["gradients_gb"] == pytest.approx(14) and half["optimizer_gb"] == pytest.approx(42)
    lora = mem(capsys, *shape, "--train", "lora", "--lora-rank", "8")
    assert lora["trainable_params"] == 32 * 4 * 8 * 2 * 4096
    assert lora["optimizer_gb"] == pytest.approx(lora["trainable_params"] * 12 / 1e9)
    assert lora["weights_gb"] == pytest.approx(14, abs=0.1)
    recompute = mem(capsys, *shape, "--train", "full", "--recompute")
    assert recompute["activations_gb"] < full["activations_gb"] / 10
    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer
    assert full["activations_gb"] == pytest.approx(2048 * 4096 * (34 + 5 * 32 * 2048 / 4096) * 32 / 1e9)


def test_bad_values_are_one_line_errors():
    proc = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "mem", "--params", "seven"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "seven" in proc.stderr


@pytest.mark.slow
def test_estimate_matches_measured_on_default_model(capsys, default_model):
    r = mem(capsys, str(default_model), "--dtype", "fp16", "--measure")
    measured = r["measured"]
    assert r["weights_gb"] == pytest.approx(measured["weights_gb"], rel=0.10)
    per_token = r["kv_bytes_per_token"]
    assert per_token * measured["kv_tokens"] / 1e9 == pytest.approx(measured["kv_cache_gb"], rel=0.10)


def resident_fraction(t) -> float:
    """Fraction of the tensor's pages in RAM now (mincore), whatever else the process holds."""
    import ctypes
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr() // page * page
    length = t.data_ptr() + t.untyped_storage().nbytes() - start
    pages = (ctypes.c_ubyte * (-(-length // page)))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) == 0
    return sum(p & 1 for p in pages) / len(pages)


def test_the_kv_cache_is_resident_from_the_start():
    """The start-up table's KV figure is resident at once, so a server's memory does not climb
    for hours as traffic reaches blocks it has not used yet (prefix caching hands those out
    before it evicts cached ones)."""
    import torch

    from quantserve.kvcache.paged import PagedKVCache

    cache = PagedKVCache(4, 512, 64, 4, 64, torch.float16, kv_bits=8)     # [L, blocks, 64, Hkv, D] int8 + scales
    for part in (cache.k, cache.v, cache.k_scale, cache.v_zero):
        assert resident_fraction(part) == 1.0


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype, width", [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_the_weights_row_counts_every_weight_held(tiny_llama, monkeypatch, backend, dtype, width):
    """The start-up table's weights figure is the model's parameters at their storage width,
    whatever runtime kind holds them (float panels, bf16 pairs, or torch's own tensors)."""
    from quantserve import kernels
    from quantserve.config import EngineConfig
    from quantserve.engine.engine import Engine
    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    if backend == "torch":
        monkeypatch.setattr(loader, "ops_for", lambda *args: TorchOps())
    elif kernels.cpu() is None:
        pytest.skip("no native kernels here")
    engine = Engine(tiny_llama, EngineConfig(dtype=dtype, cache_max_tokens=1024), progress=False)
    args = engine.args
    norms = (2 * args.num_layers + 1) * args.hidden_size               # float32 on CPU, not in `width`
    expected = (args.num_params() - norms) * width + norms * 4
    assert engine.weights_bytes == expected
