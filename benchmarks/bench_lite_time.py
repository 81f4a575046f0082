"""Issue 8's time bar: `lite auto_awq` and `lite auto_gptq` with the tutorial's flags, wall clock.

    python benchmarks/bench_lite_time.py

The default model, PTB calibration, 128 windows of 2048 tokens, group 64, `--batch-size 1`
(auto_awq also `--search-scale False`, as the tutorial), each command run alone as a user runs it,
then each result's WikiText-2 perplexity (2048 tokens, first 40 windows, float32, as
bench_weight_quality scores). Names the CPU and the kernel backend (whether the calibration
forward ran bfloat16 on vdpbf16ps). Writes benchmarks/results/lite_time.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import log  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve import kernels  # noqa: E402
from quantserve.models.resolve import default_model_path  # noqa: E402
from quantserve.quant.calib import calibration_dtype  # noqa: E402

RESULTS = Path(__file__).with_name("results")
TUTORIAL = ["--calib-dataset", "ptb", "--calib-samples", "128", "--calib-seqlen", "2048", "--w-bits", "4",
            "--w-group-size", "64", "--batch-size", "1"]
COMMANDS = {"auto_awq": [*TUTORIAL, "--search-scale", "False"], "auto_gptq": TUTORIAL}
BAR_S = 600


def quantserve(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "quantserve.cli.main", *args], check=True, capture_output=True,
                          text=True).stdout


def timed_lite(method: str, model: Path, out: Path) -> float:
    start = time.perf_counter()
    quantserve("lite", method, str(model), *COMMANDS[method], "--work-dir", str(out))
    return time.perf_counter() - start


def perplexity(model: Path) -> float:
    out = quantserve("eval", "ppl", str(model), "--dtype", "float32", "--dataset", "wikitext2", "--seqlen", "2048",
                     "--max-windows", "40", "--json")
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def markdown(rows: dict, side: str) -> str:
    lines = [f"{side}.", "", "| command (tutorial flags) | wall clock | under 10 min | WikiText-2 ppl (2048, 40 windows) |",
             "|---|---:|---|---:|"]
    lines += [f"| `lite {m}` | {int(r['seconds']) // 60} min {int(r['seconds']) % 60} s | "
              f"{'yes' if r['seconds'] < BAR_S else '**no**'} | {r['ppl']:.3f} |" for m, r in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=sorted(COMMANDS), default=list(COMMANDS))
    args = p.parse_args()
    model = default_model_path()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            log(f"lite {method} ...")
            out = Path(tmp) / method
            rows[method] = {"seconds": timed_lite(method, model, out), "ppl": perplexity(out)}
            log(f"lite {method}: {rows[method]}")
    side = (f"{cpu_name()}; kernels {kernels.describe()}; calibration forward in {calibration_dtype()}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lite_time.json").write_text(json.dumps({"rows": rows, "side": side, "flags": COMMANDS}, indent=2))
    text = markdown(rows, side)
    (RESULTS / "lite_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
