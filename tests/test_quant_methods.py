"""RTN, AWQ and GPTQ on a tiny model: each calibrated method beats round-to-nearest on the
error it optimises, checkpoints load, and calibration settings fail clearly."""
from __future__ import annotations

import pytest
import torch

from quantserve.quant.gptq import gptq_linear
from quantserve.quant.primitives import QuantError, QuantSpec, quantize


def correlated_inputs(k: int, rows: int = 4096, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    mix = torch.randn(k, k) * 0.3 + torch.eye(k)
    return torch.randn(rows, k) @ mix * (torch.rand(k) * 3)        # uneven channel scales, as activations


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(3, 64), QuantSpec(4, 32, symmetric=True)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_lowers_the_output_error_of_rtn(spec, desc_act):
    x = correlated_inputs(256)
    w = torch.randn(96, 256)
    h = 2 * x.t() @ x / x.shape[0]
    rtn = quantize(w, spec, min_zero=1).dequantize()
    ours = gptq_linear(w, h, spec, 0.01, desc_act)
    assert int(ours.zeros.min()) >= 1                               # storable as GPTQ's zero - 1
    err = lambda wq: float(((x @ (wq - w).t()) ** 2).mean())       # noqa: E731
    assert err(ours.dequantize()) < 0.7 * err(rtn)


def test_awq_clipping_lowers_the_output_error():
    from quantserve.quant.awq import clip_ratios

    x = correlated_inputs(256, rows=512)
    w = torch.randn(64, 256)
    w[:, 7] *= 20                                                  # an outlier column stretches the ranges
    spec = QuantSpec(4, 64)
    ratios = clip_ratios(w, x, spec)
    err = lambda wq: float(((x @ (wq - w).t()) ** 2).mean())       # noqa: E731
    assert bool((ratios <= 1).all()) and bool((ratios < 1).any())
    assert err(quantize(w, spec, ratios).dequantize()) < err(quantize(w, spec).dequantize())


def test_awq_scale_search_prefers_protecting_salient_channels():
    from quantserve.quant.awq import best_alpha, scales_for

    x = correlated_inputs(256, rows=1024)
    x[:, :4] *= 30                                                 # a few salient input channels
    w = torch.randn(64, 256)
    spec = QuantSpec(3, 64)
    alpha = best_alpha(w, x.abs().mean(0), x, spec)
    err = lambda s: float(((x @ ((quantize(w * s, spec).dequantize() / s) - w).t()) ** 2).mean())  # noqa: E731
    assert alpha > 0 and err(scales_for(x.abs().mean(0), alpha)) < err(torch.ones(256))


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_write_loadable_checkpoints(tiny_chat_model, tmp_path, method):
    from quantserve.api import pipeline
    from quantserve.config import EngineConfig, GenerationConfig
    from quantserve.quant.run import LiteJob, run

    out = tmp_path / method
    summary = run(LiteJob(str(tiny_chat_model), str(out), method, QuantSpec(4, 32), calib_dataset="wikitext2",
                          calib_samples=4, calib_seqlen=64, batch_size=2, search_scale=True, desc_act=True,
                          progress=False))
    assert f"{method.upper()} W4 g32" in summary and "MB" in summary
    pipe = pipeline(str(out), EngineConfig(dtype="float32", cache_max_tokens=1024), progress=False)
    reply = pipe("hello", gen_config=GenerationConfig(max_new_tokens=5))
    assert reply.generate_token_len >= 1


def test_calibration_data_choices(tmp_path):
    from quantserve.quant.calib import calibration_text

    assert "the" in calibration_text("ptb")[:2000]
    with pytest.raises(QuantError, match="not reachable"):
        calibration_text("c4")
    with pytest.raises(QuantError, match="nor an existing"):
        calibration_text("imagenet")
    lines = tmp_path / "mine.jsonl"
    lines.write_text('{"text": "first document"}\n{"text": "second one"}\n')
    assert calibration_text(str(lines)) == "first document\n\nsecond one"


def test_hessian_from_a_share_of_the_rows_estimates_the_whole():
    """GPTQ's X^T X is capped at HESSIAN_ROWS token rows: a random share of every chunk."""
    from quantserve.quant.calib import InputStats

    x = torch.randn(8192, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2.0, 16)
    whole, share = InputStats(64, True), InputStats(64, True, 0.25)
    for chunk in x.split(512):
        whole.add(chunk)
        share.add(chunk)
    assert (whole.hessian_rows, share.hessian_rows, share.rows) == (8192, 2048, 8192)
    # sampling error of 2048 rows in 16 dimensions is ~sqrt(16 / 2048) = 9%; a wrong normalisation is 75%
    assert float((share.hessian() - whole.hessian()).norm() / whole.hessian().norm()) < 0.15


def test_gptq_act_order_is_on_unless_turned_off():
    from quantserve.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["lite", "auto_gptq", "/m"]).desc_act is True
    assert parse(["lite", "auto_gptq", "/m", "--desc-act", "False"]).desc_act is False
    assert parse(["lite", "auto_gptq", "/m", "--desc-act"]).desc_act is True


@pytest.mark.parametrize("family", ["llama", "internlm2"])
def test_layer_by_layer_calibration_feeds_each_layer_the_quantized_outputs(tiny_dirs, tmp_path, family):
    """The runner's statistics equal a whole-model forward: of the float model while nothing is
    replaced, and of the RTN model (at every layer's first projection) once each layer is."""
    from quantserve.models.loader import checkpoint_files, read_checkpoint, read_config
    from quantserve.quant.arch import arch_for
    from quantserve.quant.calib import collect_stats
    from quantserve.quant.run import LiteJob, run
    from quantserve.quant.sequential import LayerwiseRunner

    model, spec = tiny_dirs[family], QuantSpec(4, 32)
    cfg = read_config(model)
    arch, weights = arch_for(cfg["model_type"]), read_checkpoint(checkpoint_files(model), False)
    windows = torch.randint(0, cfg["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    rtn_dir = tmp_path / "rtn"
    run(LiteJob(str(model), str(rtn_dir), "rtn", spec, calib_samples=0, fake_quant=True, progress=False))

    def rtn_layer(layer: int) -> dict[str, torch.Tensor]:
        names = [f"{name}.weight" for name in arch.layer_linears(layer)]
        return {n: quantize(weights[n].float(), spec, min_zero=1).dequantize() for n in names}

    def statistics(replace: bool) -> dict:
        seen: dict = {}

        def record(layer, stats):
            seen.update(stats)
            return rtn_layer(layer) if replace else {}

        LayerwiseRunner(model, windows, batch_size=3).run(record, progress=False)
        return seen

    def assert_same(seen: dict, expected: dict, keys: list[str]) -> None:
        assert len(keys) >= cfg["num_hidden_layers"]
        for key in keys:
            torch.testing.assert_close(seen[key].mean_abs, expected[key].mean_abs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(seen[key].hessian(), expected[key].hessian(), rtol=1e-3, atol=1e-4)

    float_stats = collect_stats(model, windows, 2, progress=False, hessian=True)
    assert_same(statistics(replace=False), float_stats, list(float_stats))
    rtn_stats = collect_stats(rtn_dir, windows, 2, progress=False, hessian=True)
    assert_same(statistics(replace=True), rtn_stats, [k for k in rtn_stats if k.endswith("attn.qkv")])


def test_awq_scores_the_gate_up_group_on_the_mlp_output():
    """mlp_output(down)(x, [gate; up]) is the transformers MLP's output, and the alpha it picks
    reproduces that output at least as well as the alpha picked on the linears' outputs."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    from quantserve.quant.awq import best_alpha, mlp_output, scales_for

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=128, intermediate_size=256, hidden_act="silu")).eval()
    x = correlated_inputs(128, rows=512)
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    output = mlp_output(mlp.down_proj.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(output(x, w), mlp(x), rtol=1e-4, atol=1e-4)
    spec = QuantSpec(3, 64)
    err = lambda a: float((output(x, quantize(w * (s := scales_for(x.abs().mean(0), a)), spec).dequantize() / s)  # noqa: E731
                           - output(x, w)).pow(2).mean())
    assert err(best_alpha(w, x.abs().mean(0), x, spec, output)) <= err(best_alpha(w, x.abs().mean(0), x, spec))
