"""Loading a model directory vs loading its `quantserve convert` workspace.

    python benchmarks/bench_workspace.py [--repeats 3]

For each model: `quantserve convert` once (timed), then the engine's load (Engine(...) until it
can serve: weights read and converted, panels packed, KV cache allocated), and the load plus a
first token (which touches every weight page once), from the directory and from the workspace,
each in a fresh process, best of --repeats, files in the page cache on both sides (a first run
reads them). Models: the default SmolLM2-135M-Instruct (float16) and, where
bench_shapes.py has built them, Qwen2.5-0.5B and Llama-3.2-1B at their real shapes, float16 (the
F16 GGUF's conversion) and W4 g128 (`lite rtn`).
Writes benchmarks/results/workspace.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.convert import convert  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

SHAPES = Path.home() / ".cache" / "quantserve" / "work" / "shapes"
LOAD = """
import sys, time
from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine
start = time.perf_counter()
engine = Engine(sys.argv[1], EngineConfig(cache_max_tokens=4096, session_len=2048), progress=False)
loaded = time.perf_counter()
engine.add_request("r", list(range(10, 26)), SamplingParams(max_new_tokens=1))
while engine.has_work:
    engine.step()
print(loaded - start, time.perf_counter() - start)
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def models() -> dict[str, Path]:
    found = {"SmolLM2-135M-Instruct, float16": resolve_model(None, progress=False)}
    for shape, name in (("qwen2.5-0.5b", "Qwen2.5-0.5B"), ("llama3.2-1b", "Llama-3.2-1B")):
        if (SHAPES / shape / "model.F16.gguf").is_file():
            found[f"{name}, float16"] = resolve_model(str(SHAPES / shape / "model.F16.gguf"), progress=False)
        if (SHAPES / shape / "w4-g128" / "config.json").is_file():
            found[f"{name}, W4 g128"] = SHAPES / shape / "w4-g128"
    return found


def load_seconds(path: Path, repeats: int) -> tuple[float, float]:
    """(load, load + a first token from a 16-token prompt): the best of `repeats` fresh processes."""
    times = []
    for _ in range(repeats + 1):           # the first run warms the page cache
        out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True)
        times.append(tuple(map(float, out.stdout.split())))
    return min(t[0] for t in times[1:]), min(t[1] for t in times[1:])


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models().items():
            workspace = Path(tmp) / name.replace(",", "").replace(" ", "_")
            log(f"{name}: convert ...")
            summary = convert(name.split(",")[0], str(path), str(workspace), progress=False)
            convert_s = float(summary.split(" in ", 1)[1].split(" s", 1)[0])
            log(f"{name}: loads ...")
            (d_load, d_first), (w_load, w_first) = load_seconds(path, args.repeats), load_seconds(workspace, args.repeats)
            results[name] = {"directory_s": d_load, "workspace_s": w_load, "directory_first_token_s": d_first,
                             "workspace_first_token_s": w_first, "convert_s": convert_s,
                             "directory_mb": size_mb(path), "workspace_mb": size_mb(workspace)}
            log(f"{name}: {results[name]}")
    rows = ["| model | load: directory | workspace | faster | load + first token: directory | workspace | faster | "
            "convert (once) | directory | workspace |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        d, w = r["directory_first_token_s"], r["workspace_first_token_s"]
        rows.append(f"| {name} | {r['directory_s']:.2f} s | {r['workspace_s']:.2f} s | "
                    f"**{r['directory_s'] / r['workspace_s']:.1f}x** | {d:.2f} s | {w:.2f} s | **{d / w:.1f}x** | "
                    f"{r['convert_s']:.1f} s | {r['directory_mb']:,.0f} MB | {r['workspace_mb']:,.0f} MB |")
    md = (f"Machine: {cpu_name()}, kernels as dispatched there; the engine in a fresh process (imports excluded), "
          f"best of {args.repeats}, files in the page cache; the first token is one greedy token after a 16-token "
          "prompt.\n\n" + "\n".join(rows) + "\n")
    out = Path(__file__).with_name("results")
    (out / "workspace.json").write_text(json.dumps(results, indent=2))
    (out / "workspace.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
