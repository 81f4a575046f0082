"""Per family, beyond logit parity (test_parity.py): greedy tokens equal transformers' alone and
in a batch, and the quantized paths (RTN W4, AWQ, GPTQ, int8/int4 KV cache) load and run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import add_tokenizer, native_isas
from test_parity import REFERENCE, hf_logits, small_engine

from quantserve.config import SamplingParams
from quantserve.quant.primitives import QuantSpec
from quantserve.quant.run import LiteJob, run

FAMILIES = ["internlm", "qwen3", "llama3", "smollm3", "phi3", "qwen3_moe", "mixtral", "gemma3", "gemma2"]
PROMPTS = [list(range(3, 40)), list(range(50, 61)), list(range(7, 90, 3))]
STEPS = 32


def greedy(engine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Every prompt decoded together, greedy."""
    reqs = [engine.add_request(f"g{i}", p, SamplingParams(max_new_tokens=steps)) for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    return [r.output_token_ids for r in reqs]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_alone_and_batched(tiny_dirs, family):
    reference = tiny_dirs[REFERENCE.get(family, family)]
    expected = [hf_logits(reference, p, STEPS - 1)[1] for p in PROMPTS]
    engine = small_engine(tiny_dirs[family], max_prefill_token_num=7)
    assert [greedy(engine, [p], STEPS)[0] for p in PROMPTS] == expected
    assert greedy(engine, PROMPTS, STEPS) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_cache_runs_close_to_float(tiny_dirs, family, kv_bits):
    """The int8 / int4 cache: the first logits equal the float cache's to the cache's precision."""
    from test_parity import engine_logits

    prompt = PROMPTS[0]
    exact = engine_logits(small_engine(tiny_dirs[family]), prompt, 4)
    quant = engine_logits(small_engine(tiny_dirs[family], quant_policy=kv_bits), prompt, 4)
    assert quant.shape == exact.shape
    assert (quant[0] - exact[0]).abs().max() < (0.05 if kv_bits == 8 else 0.5) * exact[0].abs().max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_quantized_checkpoints_load_and_decode(tiny_dirs, tmp_path, family, method):
    """W4 checkpoints of each method load and decode; their logits stay near the float model's."""
    from test_parity import engine_logits

    model = add_tokenizer(Path(shutil.copytree(tiny_dirs[family], tmp_path / "model")))   # calibration text
    out = tmp_path / method
    run(LiteJob(str(model), str(out), method, QuantSpec(4, 32), calib_dataset="wikitext2", calib_samples=4,
                calib_seqlen=64, batch_size=2, progress=False))
    exact = engine_logits(small_engine(model), PROMPTS[0], 4)
    got = engine_logits(small_engine(out), PROMPTS[0], 4)
    assert got.shape == exact.shape and torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got[0], exact[0], dim=0)
    assert cos > 0.9, f"{method} W4 logits drifted: cosine {cos:.3f}"


def test_internlm_reads_bias_and_rotary_from_its_config(tiny_dirs):
    from quantserve.models.families import internlm
    from quantserve.models.loader import read_config

    cfg = read_config(tiny_dirs["internlm"])
    args = internlm.model_args({**cfg, "rotary": {"base": 500, "type": "dynamic", "scaling_factor": 2.0}})
    assert args.rope_theta == 500.0 and args.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert args.qkv_bias and args.o_bias
    plain = internlm.model_args({k: v for k, v in cfg.items() if k not in ("rotary", "bias")} | {"bias": False})
    assert plain.rope_theta == 10000.0 and plain.rope_scaling is None and not plain.qkv_bias and not plain.o_bias


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "internlm", "internlm2", "qwen3", "smollm3", "phi3",
                                    "qwen3_moe", "mixtral", "gemma3", "gemma2"])
def test_each_family_file_holds_a_recipe_that_fits_its_checkpoints(tiny_dirs, family):
    """Found by model_type alone; its AWQ/GPTQ recipe names exactly the checkpoint's linears (every
    expert's, not a MoE router), each landing in the engine module the recipe says reads its input."""
    from quantserve.models.families import registry
    from quantserve.models.loader import checkpoint_files, read_checkpoint, read_config
    from quantserve.quant.arch import quantized_linears

    cfg = read_config(tiny_dirs[family])
    fam = registry()[cfg["model_type"]]
    weights = read_checkpoint(checkpoint_files(tiny_dirs[family]), False)
    engine_names = fam.convert_weights(weights, fam.model_args(cfg))
    linears = {n.removesuffix(".weight") for n, t in weights.items()
               if t.dim() == 2 and ".layers." in n and not n.endswith(".gate.weight")}
    names = quantized_linears(fam.quant, cfg, weights)
    assert set(names) == linears and len(names) == len(linears)
    for linear in names:
        layer = int(linear.split(".")[2])
        assert f"{fam.quant.input_site(linear, layer)}.weight" in engine_names


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    from quantserve.models.loader import ModelLoadError, family_for

    with pytest.raises(ModelLoadError, match="supported model_types: gemma2, gemma3_text, internlm, internlm2, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe, smollm3"):
        family_for({"model_type": "gpt_neox"})


def test_longrope_past_the_original_length_matches_transformers_with_its_cache(tiny_dirs):
    """Phi-3's LongRoPE: positions from 64 on rotate with the long factors while the keys cached
    before keep their short-factor rotation, as transformers' forward over its own cache does
    token by token. (Its generate() instead recomputes the whole cache with the long factors at
    the crossing; a paged cache shared between requests keeps what it holds.)"""
    from test_parity import engine_logits
    from transformers import AutoModelForCausalLM, DynamicCache

    prompt, new = list(range(3, 43)), 48                       # 40 + 48 tokens: crosses position 64
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["phi3"], dtype=torch.float32).eval()
    rows, cache, ids = [], DynamicCache(config=hf.config), torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            logits = hf(ids, cache=cache, use_cache=True).logits[0, -1]
            rows.append(logits)
            ids = logits.argmax().view(1, 1)
    got = engine_logits(small_engine(tiny_dirs["phi3"], max_prefill_token_num=16), prompt, new - 1)
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory) -> Path:
    from conftest import build_mistral

    return build_mistral(tmp_path_factory.mktemp("window") / "mistral", sliding_window=13)


@pytest.mark.parametrize("backend", [*native_isas(), "torch"])
@pytest.mark.parametrize("chunk", [8192, 7])
def test_sliding_window_attention_matches_transformers(windowed_mistral, monkeypatch, backend, chunk):
    """Mistral with a 13-token window (not a multiple of the 16-token cache blocks), a 37-token
    prompt and 24 new tokens: every position attends to its last 13 only, in prefill (whole or in
    chunks of 7, later chunks reading the cache), in the fused decode step and module by module."""
    from test_parity import engine_logits, hf_logits

    from quantserve import kernels
    from quantserve.kernels.native import NativeOps
    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    ops = TorchOps() if backend == "torch" else NativeOps(kernels.load(backend), backend)
    monkeypatch.setattr(loader, "ops_for", lambda *args: ops)
    prompt = list(range(3, 40))
    expected = hf_logits(windowed_mistral, prompt, 24)[0]
    engine = small_engine(windowed_mistral, max_prefill_token_num=chunk)
    assert engine.session_len == 256                    # small_engine's, not bounded by the window
    torch.testing.assert_close(engine_logits(engine, prompt, 24), expected, atol=1e-4, rtol=0)
    if engine.model.fused is not None:                  # and the module-by-module decode path
        engine = small_engine(windowed_mistral, max_prefill_token_num=chunk)
        engine.model.fused = None
        torch.testing.assert_close(engine_logits(engine, prompt, 24), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_sliding_window_over_a_quantized_cache(windowed_mistral, kv_bits):
    """The int8 / int4 cache with a window: the logits of the prefill and the first decode steps
    (before greedy choices may part) near the float cache's; ignoring the window would not be."""
    from test_parity import engine_logits

    prompt = list(range(3, 40))
    exact = engine_logits(small_engine(windowed_mistral, max_prefill_token_num=7), prompt, 3)
    quant = engine_logits(small_engine(windowed_mistral, quant_policy=kv_bits, max_prefill_token_num=7), prompt, 3)
    err = (quant - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)
    assert (err < (0.1 if kv_bits == 8 else 0.5)).all(), err


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_experts_no_calibration_token_reaches_are_quantized_data_free(tiny_dirs, tmp_path, method):
    """8 calibration tokens make 16 picks among each MoE layer's 8 experts: every expert sees fewer
    than 16 tokens, some none. They are still quantized (round to nearest), the summary counts and
    names them, and the checkpoint loads and decodes."""
    import re

    from quantserve.models.loader import checkpoint_files, read_checkpoint
    from quantserve.quant.checkpoint import split_quantized
    from quantserve.quant.primitives import quantize

    model = add_tokenizer(Path(shutil.copytree(tiny_dirs["qwen3_moe"], tmp_path / "model")))
    out = tmp_path / method
    text = run(LiteJob(str(model), str(out), method, QuantSpec(4, 32), calib_dataset="wikitext2", calib_samples=1,
                       calib_seqlen=8, progress=False))
    found = re.search(r"(\d+) expert linears that fewer than 16 calibration tokens reached, rounded to nearest", text)
    assert found and int(found.group(1)) > 0, text
    floats = read_checkpoint(checkpoint_files(model), False)
    codes = split_quantized(read_checkpoint(checkpoint_files(out), False),
                            {"quant_method": "awq" if method == "awq" else "gptq", "bits": 4, "group_size": 32})[1]
    unreached = re.findall(r"model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj", text)
    for name in unreached:
        expected = quantize(floats[f"{name}.weight"].float(), QuantSpec(4, 32), min_zero=1 if method == "gptq" else 0)
        assert torch.equal(codes[name].q, expected.q), name
    assert torch.isfinite(engine_logits_of(out)).all()


def engine_logits_of(model_dir: Path) -> torch.Tensor:
    from test_parity import engine_logits

    return engine_logits(small_engine(model_dir), PROMPTS[0], 2)


def test_gemma2_runs_on_the_pytorch_ops_which_cap_attention_scores(tiny_dirs):
    from quantserve.models.ops import TorchOps

    engine = small_engine(tiny_dirs["gemma2"])
    assert isinstance(engine.model.ops, TorchOps) and engine.model.fused is None
    assert engine.model.args.attn_softcap == 5.0 and engine.model.args.final_softcap == 3.0
