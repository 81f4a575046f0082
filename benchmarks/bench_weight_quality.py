"""Perplexity of weight-quantized models: float, RTN, AWQ and GPTQ at W4 and W3, group 64.

    python benchmarks/bench_weight_quality.py                    # default model, 40 windows
    python benchmarks/bench_weight_quality.py --max-windows 0    # the whole WikiText-2 test split

Every quantized model is pseudo-quantized (`lite … --fake-quant`: the dequantized weights, in
float32) so W3 and W4 are scored alike; calibration is 128 windows x 512 tokens of PTB train or
WikiText-2 (bundled validation split). Evaluation: WikiText-2 test, the papers' protocol,
seqlen 2048 and 512, the first --max-windows windows for every row. Each row's numbers are saved
as soon as they exist (benchmarks/results/weight_quality.json), so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantserve.bench.perplexity import dataset_text, perplexity  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.quant.primitives import QuantSpec  # noqa: E402
from quantserve.quant.run import LiteJob, run  # noqa: E402
from quantserve.text import Tokenizer  # noqa: E402

RESULTS = Path(__file__).with_name("results")
OUT = RESULTS / "weight_quality.json"
ROWS = [("float", None, None, None, False)] + [
    (f"{method} W{bits}{' act-order' if act else ' in order' if method == 'gptq' else ''} ({calib})",
     method, bits, calib, act)
    for bits in (4, 3)
    for method, calib, act in (("rtn", "-", False), ("awq", "ptb", False), ("awq", "wikitext2", False),
                               ("gptq", "ptb", False), ("gptq", "ptb", True), ("gptq", "wikitext2", False),
                               ("gptq", "wikitext2", True))]

ORDER = {name: i for i, (name, *_) in enumerate(ROWS)}


def extra_last(row: tuple) -> bool:
    """Run order: GPTQ W3 with columns in order (beyond the issue's table) comes last."""
    _, method, bits, _, act = row
    return method == "gptq" and bits == 3 and not act


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def score(path: Path, seqlen: int, windows: int | None) -> float:
    engine = Engine(path, EngineConfig(dtype="float32", session_len=seqlen + 1, max_batch_size=1,
                                       cache_max_tokens=seqlen + 64), progress=False)
    result = perplexity(engine, dataset_text("wikitext2"), Tokenizer(path).hf, seqlen, windows, progress=False)
    return result.ppl


def make(model: Path, out: Path, method: str, bits: int, calib: str, act: bool) -> float:
    start = time.monotonic()
    run(LiteJob(str(model), str(out), method, QuantSpec(bits, 64), calib_dataset=calib if calib != "-" else "ptb",
                calib_samples=0 if method == "rtn" else 128, calib_seqlen=512, batch_size=4,
                search_scale=True, desc_act=act, fake_quant=True, progress=False))
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--max-windows", type=int, default=40, help="windows per seqlen (0 = all)")
    p.add_argument("--table-only", action="store_true", help="write the table from the saved results")
    args = p.parse_args()
    if args.table_only:
        return write_table(json.loads(OUT.read_text()))
    windows = args.max_windows or None
    model = resolve_model(args.model)
    done = json.loads(OUT.read_text()) if OUT.is_file() else {}
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, method, bits, calib, act in sorted(ROWS, key=extra_last):
            if name in done:
                continue
            log(f"{name}: quantizing and scoring")
            path, seconds = model, 0.0
            if method is not None:
                path = Path(tmp) / "q"
                seconds = make(model, path, method, bits, calib, act)
            done[name] = {"ppl_2048": score(path, 2048, windows), "ppl_512": score(path, 512, windows),
                          "quantize_s": seconds, "windows": windows}
            OUT.write_text(json.dumps(done, indent=2))
            log(f"{name}: {done[name]}")
    write_table(done)


def write_table(done: dict) -> None:
    base = done["float"]
    lines = ["| model | ppl @2048 | ppl @512 | gap to float closed vs RTN (2048) |", "|---|---|---|---|"]
    for name in sorted(done, key=lambda n: ORDER.get(n, len(ORDER))):
        r = done[name]
        bits = name.split("W")[1][0] if "W" in name else None
        rtn = done.get(f"rtn W{bits} (-)") if bits else None
        closed = ""
        if rtn and not name.startswith("rtn") and rtn["ppl_2048"] > base["ppl_2048"]:
            closed = f"{(rtn['ppl_2048'] - r['ppl_2048']) / (rtn['ppl_2048'] - base['ppl_2048']):.0%}"
        lines.append(f"| {name} | {r['ppl_2048']:.3f} | {r['ppl_512']:.3f} | {closed} |")
    missing = [name for name, *_ in ROWS if name not in done]
    if missing:
        lines.append(f"\nNot measured yet (the script resumes where it stopped): {', '.join(missing)}.")
    (RESULTS / "weight_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
