"""Which linears make in-order GPTQ lose to RTN at 3 bits: each row quantizes every linear with
GPTQ in column order except one kind, which gets act-order.

    python benchmarks/bench_gptq_order.py          # default model, W3 g64, PTB 64 x 512

Calibration once (PTB, 64 windows of 512 tokens, Hessians); GPTQ in order and with act-order
for every linear; pseudo-quantized models scored on the first 5 WikiText-2 test windows of
512 tokens. Results: benchmarks/results/gptq_order.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from quantserve.bench.perplexity import dataset_text, perplexity  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.loader import checkpoint_files, read_checkpoint, read_config  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.quant.arch import arch_for, quantized_linears  # noqa: E402
from quantserve.quant.calib import calibration_windows, collect_stats  # noqa: E402
from quantserve.quant.checkpoint import save_float  # noqa: E402
from quantserve.quant.gptq import gptq_linear  # noqa: E402
from quantserve.quant.primitives import QuantSpec, quantize  # noqa: E402

RESULTS = Path(__file__).with_name("results")
SEQLEN, WINDOWS = 512, 5
KINDS = {"q/k": ("q_proj", "k_proj"), "v": ("v_proj",), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def variants(model: Path, spec: QuantSpec) -> tuple[dict, dict, list[str]]:
    """The float weights, and per linear its RTN, in-order GPTQ and act-order GPTQ weights."""
    cfg = read_config(model)
    arch = arch_for(cfg["model_type"])
    windows = calibration_windows(AutoTokenizer.from_pretrained(model), "ptb", 64, SEQLEN)
    stats = collect_stats(model, windows, 4, progress=True, hessian=True)
    weights = read_checkpoint(checkpoint_files(model), False)
    names = quantized_linears(arch, cfg["num_hidden_layers"])
    out = {}
    for i, name in enumerate(names):
        w, layer = weights[f"{name}.weight"].float(), int(name.split(".")[2])
        h = stats[arch.input_site(name, layer)].hessian()
        out[name] = {"rtn": quantize(w, spec, min_zero=1).dequantize(),
                     "in order": gptq_linear(w, h, spec, 0.01, False).dequantize(),
                     "act-order": gptq_linear(w, h, spec, 0.01, True).dequantize()}
        if i % 30 == 0:
            log(f"GPTQ {i}/{len(names)}")
    return weights, out, names


def score(model: Path, weights: dict, chosen: dict) -> float:
    """Perplexity of the model with `chosen` (HF name -> weight) in place of its linears."""
    cfg = read_config(model)
    mixed = {**weights, **{f"{n}.weight": w.to(weights[f"{n}.weight"].dtype) for n, w in chosen.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        save_float(model, Path(tmp), cfg, mixed)
        engine = Engine(Path(tmp), EngineConfig(dtype="float32", session_len=SEQLEN + 1, max_batch_size=1,
                                                cache_max_tokens=SEQLEN + 64), progress=False)
        text = dataset_text("wikitext2")
        return perplexity(engine, text, AutoTokenizer.from_pretrained(model), SEQLEN, WINDOWS, progress=False).ppl


def rows(names: list[str]) -> dict[str, dict[str, str]]:
    """Row label -> the variant each linear takes."""
    table = {v: {n: v for n in names} for v in ("rtn", "in order", "act-order")}
    for kind, suffixes in KINDS.items():
        table[f"in order, {kind} act-order"] = {n: "act-order" if n.endswith(suffixes) else "in order" for n in names}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--bits", type=int, default=3)
    args = p.parse_args()
    model = resolve_model(args.model)
    start = time.monotonic()
    weights, out, names = variants(model, QuantSpec(args.bits, 64))
    results = {}
    for label, choice in rows(names).items():
        results[label] = score(model, weights, {n: out[n][choice[n]] for n in names})
        log(f"{label}: {results[label]:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_order.json").write_text(json.dumps({"bits": args.bits, "ppl_512": results}, indent=2))
    lines = [f"W{args.bits} g64, PTB 64 x 512 calibration, WikiText-2 test ppl@512 ({WINDOWS} windows); "
             f"{time.monotonic() - start:.0f} s", "", "| GPTQ variant | ppl @512 |", "|---|---|"]
    lines += [f"| {label} | {ppl:.3f} |" for label, ppl in results.items()]
    (RESULTS / "gptq_order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
