"""Decode speed with LoRA adapters: 16 rows with no adapter, with one adapter each, and half and half.

    python benchmarks/bench_lora.py            # default model, about 2 minutes on 2 quiet cores

The default model, default engine flags, 16 requests of the same 64-token prompt submitted
together, 64 new tokens each, greedy, EOS ignored. The adapter is rank 16 on all seven
projections of every layer (random weights: the speed does not depend on them), written as a
PEFT directory. Decode tokens/s counts the tokens after each request's first over the time after
the last prefill, best of 3 runs. "no adapter, layer by layer" is the no-adapter batch with the
fused decode step switched off: the path every step with an adapter row takes, so the table
splits the overhead into leaving the fused step and the LoRA matmuls. Writes
benchmarks/results/lora.json, lora.md and lora.png.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import prompt_ids  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402
from quantserve.text import Tokenizer  # noqa: E402

RESULTS = Path(__file__).with_name("results")
ROWS, PROMPT, NEW, RANK, REPEATS = 16, 64, 64, 16, 3
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(model_dir: Path, out: Path, rank: int = RANK) -> Path:
    """A PEFT LoRA directory for the model: rank `rank` on every projection, random A and B."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}                                      # (in, out)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                k, n = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes), "bias": "none"}))
    return out


def decode_rate(engine: Engine, prompt: list[int], loras: list[str | None]) -> float:
    """Decode tokens/s of len(loras) requests submitted together (each row with its adapter)."""
    requests = [engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=NEW), lora=lora)
                for i, lora in enumerate(loras)]
    while not all(r.output_token_ids for r in requests):
        engine.step()
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return sum(len(r.output_token_ids) - 1 for r in requests) / (time.perf_counter() - start)


def measure(engine: Engine, prompt: list[int]) -> list[dict]:
    cases = [("no adapter", [None] * ROWS, True),
             ("no adapter, layer by layer", [None] * ROWS, False),
             ("half the rows with the adapter", ["r16"] * (ROWS // 2) + [None] * (ROWS // 2), True),
             ("every row with the adapter", ["r16"] * ROWS, True)]
    fused = engine.model.fused
    rows = []
    for name, loras, keep_fused in cases:
        engine.model.fused = fused if keep_fused else None
        rate = max(decode_rate(engine, prompt, loras) for _ in range(REPEATS))
        rows.append({"case": name, "adapter_rows": sum(x is not None for x in loras), "tok_s": rate})
        print(f"{name}: {rate:.1f} tok/s", flush=True)
    engine.model.fused = fused
    for row in rows:
        row["vs_no_adapter"] = row["tok_s"] / rows[0]["tok_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| 16 rows, 64 new tokens each | rows with the adapter | decode tok/s | vs no adapter |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['adapter_rows']} | {r['tok_s']:.1f} | {r['vs_no_adapter']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["case"] for r in rows][::-1], [r["tok_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("decode tokens/s (16 rows)")
    ax.set_title(f"SmolLM2-135M-Instruct, LoRA rank {RANK} on all seven projections", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    model_dir = resolve_model(None)
    prompt = prompt_ids(Tokenizer(model_dir).hf, PROMPT)
    engine = Engine(model_dir, EngineConfig(max_batch_size=ROWS), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        engine.add_lora("r16", write_adapter(model_dir, Path(tmp)))
    decode_rate(engine, prompt[:16], [None, "r16"])                                   # warm-up
    rows = measure(engine, prompt)
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpu": cpu_name(), "kernels": engine.kernel_backend(), "fused_decode": engine.model.fused is not None}
    (RESULTS / "lora.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    md = table(rows) + f"\nMachine: {machine['cpu']}; kernels: {machine['kernels']}.\n"
    (RESULTS / "lora.md").write_text(md)
    plot(rows, RESULTS / "lora.png")
    print(md)


if __name__ == "__main__":
    main()
