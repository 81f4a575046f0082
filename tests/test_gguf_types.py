"""GGUF files at their own bits, on fixtures written by llama.cpp's own `llama-quantize` (one file
per tensor type, plus a Q4_K_M mix; tests/data/gguf/make_fixtures.py): weights against `gguf`'s
dequantization, log-probabilities against llama.cpp's (`llama-perplexity`'s saved ones), memory
against the file."""
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_parity import small_engine

from quantserve.config import SamplingParams
from quantserve.models.gguf import convert_gguf, unpermute_qk
from quantserve.models.gguf_blocks import relative_rms
from quantserve.models.loader import checkpoint_files, read_checkpoint, read_config
from quantserve.quant.checkpoint import split_quantized
from quantserve.quant.primitives import QuantSpec

DATA = Path(__file__).parent / "data" / "gguf"
REFERENCE = json.loads((DATA / "reference.json").read_text())
EXACT = ["Q4_0", "Q4_1", "Q8_0"]
TO_8BIT = ["Q5_0", "Q5_1", "Q5_K", "Q6_K"]
TO_4BIT = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]
ALL = EXACT + ["Q4_K"] + TO_8BIT + TO_4BIT
# llama.cpp computes differently too (float16 KV cache, its own activation blocks: per 256 for
# K-quants), so log-probabilities agree to these bounds, measured 0.08-0.19, 0.20-0.30, 1.6-2.1
LOGPROB_TOLERANCE = {**{t: 0.25 for t in EXACT + ["Q4_K", "Q4_K_M"]}, **{t: 0.4 for t in TO_8BIT},
                     **{t: 3.0 for t in TO_4BIT}}
NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-types")
    return {kind: convert_gguf(DATA / f"tiny-{kind}.gguf", root / kind, progress=False) for kind in ALL + ["Q4_K_M"]}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens"
    if gguf_name == "output.weight":
        return "lm_head"
    _, layer, part, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{NAMES[part]}"


def gguf_reference(kind: str) -> dict[str, np.ndarray]:
    """Every matrix of the fixture as gguf dequantizes it, q/k rows back in Hugging Face order."""
    out = {}
    for t in gguf.GGUFReader(DATA / f"tiny-{kind}.gguf").tensors:
        if len(t.shape) == 2:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(int(t.shape[1]), -1)
            heads = {"attn_q": 4, "attn_k": 2}.get(t.name.split(".")[2]) if t.name.startswith("blk") else None
            out[hf_name(t.name)] = unpermute_qk(w, heads) if heads else w
    return out


def loaded_codes(model_dir: Path) -> dict:
    cfg = read_config(model_dir)
    return split_quantized(read_checkpoint(checkpoint_files(model_dir), False), cfg["quantization_config"])[1]


@pytest.mark.parametrize("kind", ALL)
def test_weights_against_gguf_dequantization(converted, kind):
    codes, want = loaded_codes(converted[kind]), gguf_reference(kind)
    assert set(codes) == set(want)
    summary = read_config(converted[kind])["quantization_config"]["gguf_types"][kind]
    for name, qw in codes.items():
        ours = qw.dequantize().numpy()
        if kind in EXACT:
            assert np.array_equal(ours, want[name]), name
        elif kind == "Q4_K":         # d * sc and dmin * m rounded to float16: within half an ulp of each
            groups = want[name].reshape(len(ours), -1, 32)
            bound = 2.0 ** -11 * (np.abs(qw.scales.numpy()) * 15 + np.abs(qw.offsets().numpy())) * 1.01
            assert (np.abs(ours.reshape(groups.shape) - groups) <= bound[..., None]).all(), name
            assert relative_rms(ours, want[name]) < 1e-3
            assert relative_rms(ours, want[name]) <= summary["max_rel_rms_error"] + 1e-6    # all rows sampled here
        else:
            assert 0 < relative_rms(ours, want[name]) <= summary["max_rel_rms_error"] + 1e-6
        assert qw.spec.bits == (8 if kind in TO_8BIT or kind == "Q8_0" else 4)
    bound = {"Q4_K": 1e-3, **{t: 0.008 for t in TO_8BIT}, **{t: 0.09 for t in TO_4BIT}}.get(kind, 1e-9)
    assert summary["max_rel_rms_error"] < bound


@torch.inference_mode()
def window_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-probabilities of the next token at every position, prefilled in chunks."""
    request = engine.add_request("window", ids, SamplingParams(max_new_tokens=1))
    rows = []
    while request.num_computed_tokens < len(ids):
        out = engine.scheduler.schedule()
        hidden, _ = engine.runner.hidden_states(out)
        rows.append(engine.model.compute_logits(hidden).log_softmax(-1))
        engine.scheduler.update(out, {})
    engine.abort(request.request_id)
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ALL + ["Q4_K_M"])
def test_logprobs_close_to_llama_cpp(converted, kind):
    engine = small_engine(converted[kind], max_prefill_token_num=24)       # chunked prefill, then the cache
    worst = 0.0
    for chunk in REFERENCE["files"][f"tiny-{kind}.gguf"]["chunks"]:
        ours = window_logprobs(engine, chunk["tokens"])
        for i, top in enumerate(chunk["top"]):
            row = ours[chunk["first"] + i]
            worst = max(worst, max(abs(row[t].item() - logp) for t, logp in top))
            # llama.cpp's most likely token is (within the tolerance) ours too
            assert row.max() - row[top[0][0]] < LOGPROB_TOLERANCE[kind]
    assert worst < LOGPROB_TOLERANCE[kind]


@pytest.mark.parametrize("kind", EXACT + ["Q4_K", "IQ4_NL"])
def test_memory_after_load_is_close_to_the_file(converted, kind):
    engine = small_engine(converted[kind])
    assert engine.model.weight_bytes() <= 1.15 * (DATA / f"tiny-{kind}.gguf").stat().st_size


def test_mixed_widths_fuse_at_the_widest(converted):
    """Q4_K_M keeps layer 1's attn_v and ffn_down and the output at Q6_K (here 8 bits in groups of
    256) beside 4-bit q and k in groups of 32: that layer's fused qkv runs at 8 bits in groups of
    32 (codes keep their values, the 8-bit part's scales repeat); its down keeps groups of 256."""
    summary = read_config(converted["Q4_K_M"])["quantization_config"]["gguf_types"]
    assert set(summary) == {"Q4_K", "Q6_K"}
    codes = loaded_codes(converted["Q4_K_M"])
    assert codes["model.layers.1.self_attn.v_proj"].spec == QuantSpec(8, 256)
    assert codes["model.layers.1.self_attn.q_proj"].spec == QuantSpec(4, 32)
    layers = small_engine(converted["Q4_K_M"]).model.layers
    assert [layer.attn.qkv.spec for layer in layers] == [QuantSpec(4, 32), QuantSpec(8, 32)]
    assert [layer.mlp.down.spec for layer in layers] == [QuantSpec(4, 32), QuantSpec(8, 256)]


def test_an_all_zero_group_requantizes_to_zeros():
    """A group of zeros (padded rows, pruned weights) has a range of 0: its scale must not round
    to a float16 0 (and its min to 0 / 0)."""
    from quantserve.models.gguf_blocks import requantize

    w = np.concatenate([np.zeros((2, 256), np.float32), np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)])
    for kind in ("Q6_K", "Q3_K"):
        c = requantize(w, kind)
        assert np.isfinite(c.scales).all() and np.isfinite(c.mins).all() and np.isfinite(c.error)
        assert np.array_equal(c.dequantize()[:2], np.zeros((2, 256), np.float32))
