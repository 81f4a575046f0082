"""quantserve vs llama.cpp's own tools, built natively, on the shapes of real models.

    python benchmarks/bench_shapes.py                              # every shape, best of 3
    python benchmarks/bench_shapes.py --shapes qwen2.5-0.5b --skip-build

bench_llamacpp.py compares the two engines on the tiny default model (SmolLM2-135M) only. This
script does it at the EXACT dimensions of real models, with random weights (no hub access
here, and speed does not depend on the weights' values):

    Qwen2.5-0.5B      hidden 896, intermediate 4864, 24 layers, 14 heads / 2 KV heads, head_dim 64,
                      vocab 151936, tied embeddings, bias on q/k/v, rope_theta 1e6, rms eps 1e-6
    InternLM2.5-1.8B  hidden 2048, intermediate 8192, 24 layers, 16 heads / 8 KV heads, head_dim 128,
                      vocab 92544, untied output, no bias, rope_theta 1e6, rms eps 1e-5
    Llama-3.2-1B      hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 KV heads, head_dim 64,
                      vocab 128256, tied embeddings, no bias, rope_theta 5e5, rms eps 1e-5
    Qwen3-1.7B        hidden 2048, intermediate 6144, 28 layers, 16 heads / 8 KV heads, head_dim 128,
                      vocab 151936, tied embeddings, per-head q/k RMSNorm, rope_theta 1e6, rms eps 1e-6
    Qwen3-30B-A3B     a mixture of experts: hidden 2048, 48 layers (4 run here: 61 GB in F16 whole),
                      32 heads / 4 KV heads, head_dim 128, 128 experts of 768 a layer, 8 a token,
                      untied output, vocab 151936 (GGUF architecture `qwen3moe`)

One model per shape, written once as an F16 GGUF that both sides load (normal * 0.02 weights from
a fixed seed, RMSNorm weights 1, norms and biases F32, as llama.cpp stores them): GGUF architecture
`qwen2` for Qwen2.5 (llama.cpp's and quantserve's qwen2 have the q/k/v bias), `qwen3` for Qwen3,
`llama` for Llama and for InternLM (the same computation as `internlm2`, which quantserve's GGUF
reader does not accept). The vocabulary is synthetic but of each model's kind, with the real number
of tokens (so the embedding and the output head have the real number of rows): byte-level BPE for
Qwen and Llama 3 (`tokenizer.ggml.model`
"gpt2", pre-tokenizer "qwen2": 3 control tokens, the 256 byte symbols, space-prefixed ASCII pieces
with their merges, filler pieces), sentencepiece for InternLM ("llama": <unk> <s> </s>, the 256
byte tokens, ASCII pieces, filler pieces). llama.cpp loads both; quantserve's GGUF converter
builds the tokenizer from them through transformers, as for any GGUF.

- llama.cpp: `llama-quantize` F16 -> Q4_0 (group 32) and -> Q4_K_M (the usual download; 4-bit
  K-quants with some tensors at 6 bits); llama-quantize picks the output head's type: the types
  are in the results;
- quantserve, two ways: (a) W4 g128 from the F16 file (`convert_gguf` keeps F16 tensors float16,
  then `quantserve lite rtn --w-bits 4 --w-group-size 128`, int8 output head at load, the default);
  (b) llama.cpp's own Q4_0 and Q4_K_M files read at their own bits (`convert_gguf`, timed: the
  first load; the engine's load from the converted directory is the second), issue 18's target.

Both sides 2 threads, greedy, best of --repeats (3), measured as in bench_llamacpp.py:
- decode batch 1: `llama-bench -n 128` (tg128) vs our 128 new tokens after a 128-token prompt;
- prefill: `llama-bench -p 512` (pp512) vs one 512-token prompt;
- 16 streams: `llama-batched-bench -npp 128 -ntg 128 -npl 16` (S_TG) vs 16 prompts of 128 decoded
  together (total tokens/s of the decode phase).
Models are cached under ~/.cache/quantserve/work/shapes/<shape>/ (reruns skip building them).
Writes benchmarks/results/shapes.{json,md,png}.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_llamacpp as bench_llamacpp  # noqa: E402
from benchmarks.bench_engine import REPEATS, engine_rates, log  # noqa: E402
from benchmarks.bench_llamacpp import STREAMS, THREADS, bench_theirs, llamacpp_isa, ratio, tool  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve import envs, kernels  # noqa: E402
from quantserve.bench.results import try_plot  # noqa: E402
from quantserve.config import EngineConfig  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402

RESULTS = Path(__file__).with_name("results")
SEED = 1234
STD = 0.02
GROUP = 128
LLAMACPP_TYPES = ("Q4_0", "Q4_K_M")          # llama.cpp's side: the classic 4-bit type and the usual download

# The real models' config.json values (Qwen/Qwen2.5-0.5B, internlm/internlm2_5-1_8b,
# meta-llama/Llama-3.2-1B, Qwen/Qwen3-1.7B; Llama 3.2's llama3 RoPE scaling left out: speed only).
SHAPES = {
    "qwen2.5-0.5b": dict(name="Qwen2.5-0.5B", arch="qwen2", tokenizer="bpe", hidden=896, intermediate=4864,
                         layers=24, heads=14, kv_heads=2, head_dim=64, vocab=151936, tied=True, qkv_bias=True,
                         rope_theta=1e6, rms_eps=1e-6, context=32768),
    "internlm2.5-1.8b": dict(name="InternLM2.5-1.8B", arch="llama", tokenizer="spm", hidden=2048, intermediate=8192,
                             layers=24, heads=16, kv_heads=8, head_dim=128, vocab=92544, tied=False, qkv_bias=False,
                             rope_theta=1e6, rms_eps=1e-5, context=32768),
    "llama3.2-1b": dict(name="Llama-3.2-1B", arch="llama", tokenizer="bpe", hidden=2048, intermediate=8192,
                        layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True, qkv_bias=False,
                        rope_theta=5e5, rms_eps=1e-5, context=131072),
    "qwen3-1.7b": dict(name="Qwen3-1.7B", arch="qwen3", tokenizer="bpe", hidden=2048, intermediate=6144,
                       layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936, tied=True, qkv_bias=False,
                       rope_theta=1e6, rms_eps=1e-6, context=40960),
    # Qwen/Qwen3-30B-A3B: 128 experts of 768, 8 a token, in each of 48 layers; 4 of them are run
    # (the whole is 61 GB in F16), so the embedding and head weigh more here than in the model
    "qwen3-30b-a3b": dict(name="Qwen3-30B-A3B", arch="qwen3moe", tokenizer="bpe", hidden=2048, intermediate=6144,
                          layers=48, bench_layers=4, heads=32, kv_heads=4, head_dim=128, vocab=151936, tied=False,
                          qkv_bias=False, rope_theta=1e6, rms_eps=1e-6, context=40960, experts=128, experts_used=8,
                          expert_ffn=768),
}


def tensor_specs(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(llama.cpp tensor name, torch-layout shape [out, in], kind) of every tensor, in file order."""
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    specs = [("token_embd.weight", (s["vocab"], h), "weight")]
    for i in range(s["layers"]):
        b = f"blk.{i}"
        specs += [(f"{b}.attn_norm.weight", (h,), "norm"), (f"{b}.attn_q.weight", (q, h), "weight"),
                  (f"{b}.attn_k.weight", (kv, h), "weight"), (f"{b}.attn_v.weight", (kv, h), "weight")]
        if s["qkv_bias"]:
            specs += [(f"{b}.attn_q.bias", (q,), "bias"), (f"{b}.attn_k.bias", (kv,), "bias"),
                      (f"{b}.attn_v.bias", (kv,), "bias")]
        if s["arch"].startswith("qwen3"):           # per-head RMSNorm of q and k
            specs += [(f"{b}.attn_q_norm.weight", (s["head_dim"],), "norm"),
                      (f"{b}.attn_k_norm.weight", (s["head_dim"],), "norm")]
        specs += [(f"{b}.attn_output.weight", (h, q), "weight"), (f"{b}.ffn_norm.weight", (h,), "norm")]
        specs += mlp_specs(s, b)
    specs.append(("output_norm.weight", (h,), "norm"))
    if not s["tied"]:
        specs.append(("output.weight", (s["vocab"], h), "weight"))
    return specs


def mlp_specs(s: dict, b: str) -> list[tuple[str, tuple[int, ...], str]]:
    """A dense SwiGLU MLP, or a mixture: the router and each projection's experts stacked [E, out, in]."""
    h = s["hidden"]
    if not s.get("experts"):
        i = s["intermediate"]
        return [(f"{b}.ffn_gate.weight", (i, h), "weight"), (f"{b}.ffn_up.weight", (i, h), "weight"),
                (f"{b}.ffn_down.weight", (h, i), "weight")]
    e, i = s["experts"], s["expert_ffn"]
    return [(f"{b}.ffn_gate_inp.weight", (e, h), "router"), (f"{b}.ffn_gate_exps.weight", (e, i, h), "weight"),
            (f"{b}.ffn_up_exps.weight", (e, i, h), "weight"), (f"{b}.ffn_down_exps.weight", (e, h, i), "weight")]


def random_tensor(name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """normal * 0.02 from a seed fixed per tensor name (F16 for matrices, F32 biases); norms are 1."""
    if kind == "norm":
        return np.ones(shape, dtype=np.float32)
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=gen) * STD
    return (values.half() if kind == "weight" else values).numpy()


def spm_vocabulary(size: int) -> dict:
    """A sentencepiece vocabulary (InternLM2's kind) of `size` tokens: <unk> <s> </s>, the 256 byte
    tokens (any text encodes), ASCII pieces with and without the word-start mark, then filler pieces."""
    import gguf

    t = gguf.TokenType
    ascii_ = [chr(c) for c in range(33, 127)]
    pieces = ["\u2581"] + ascii_ + [f"\u2581{c}" for c in ascii_]
    pieces += [f"\u2581w{i}" for i in range(size - 259 - len(pieces))]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [t.UNKNOWN, t.CONTROL, t.CONTROL] + [t.BYTE] * 256 + [t.NORMAL] * len(pieces)
    return dict(model="llama", pre="default", tokens=tokens, types=types, unk=0, bos=1, eos=2, add_bos=True,
                scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))])


def bpe_vocabulary(size: int) -> dict:
    """A byte-level BPE vocabulary (Qwen2's kind, split as Qwen2 splits) of `size` tokens: Qwen's
    three control tokens, the 256 byte symbols, a space-prefixed piece per printable ASCII character
    (with its merge), then filler pieces."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    t = gguf.TokenType
    space = bytes_to_unicode()[ord(" ")]
    symbols = list(bytes_to_unicode().values())
    joined = [f"{space}{chr(c)}" for c in range(33, 127)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = special + symbols + joined
    tokens += [f"{space}w{i}" for i in range(size - len(tokens))]
    types = [t.CONTROL] * 3 + [t.NORMAL] * (size - 3)
    return dict(model="gpt2", pre="qwen2", tokens=tokens, types=types, bos=0, eos=0, add_bos=False,
                merges=[f"{space} {chr(c)}" for c in range(33, 127)])


def write_metadata(writer, s: dict) -> None:
    """The architecture's hyperparameters and the vocabulary, under llama.cpp's key names."""
    writer.add_name(f"{s['name']} shape, random weights")
    writer.add_file_type(1)                                             # LLAMA_FTYPE_MOSTLY_F16
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["intermediate"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(s["head_dim"])
    writer.add_value_length(s["head_dim"])
    writer.add_rope_dimension_count(s["head_dim"])
    writer.add_rope_freq_base(s["rope_theta"])
    writer.add_layer_norm_rms_eps(s["rms_eps"])
    writer.add_vocab_size(s["vocab"])
    if s.get("experts"):
        writer.add_expert_count(s["experts"])
        writer.add_expert_used_count(s["experts_used"])
        writer.add_expert_feed_forward_length(s["expert_ffn"])
    v = (bpe_vocabulary if s["tokenizer"] == "bpe" else spm_vocabulary)(s["vocab"])
    writer.add_tokenizer_model(v["model"])
    writer.add_tokenizer_pre(v["pre"])
    writer.add_token_list(v["tokens"])
    writer.add_token_types([int(x) for x in v["types"]])
    if "scores" in v:
        writer.add_token_scores(v["scores"])
    if "merges" in v:
        writer.add_token_merges(v["merges"])
    if "unk" in v:
        writer.add_unk_token_id(v["unk"])
    writer.add_bos_token_id(v["bos"])
    writer.add_eos_token_id(v["eos"])
    writer.add_add_bos_token(v["add_bos"])


def write_gguf(s: dict, path: Path) -> None:
    """The F16 GGUF, streamed tensor by tensor (never the whole model in memory), renamed when complete."""
    import gguf

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), s["arch"])
    write_metadata(writer, s)
    specs = tensor_specs(s)
    for name, shape, kind in specs:
        dtype = np.float16 if kind == "weight" else np.float32
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, kind in specs:
        writer.write_tensor_data(random_tensor(name, shape, kind))
    writer.close()
    partial.rename(path)


def our_w4(gguf_path: Path, work: Path) -> Path:
    """quantserve's GGUF path to a float HF directory, then `quantserve lite rtn` W4 g128 (once)."""
    from quantserve.models.gguf import convert_gguf

    out = work / f"w4-g{GROUP}"
    if (out / "config.json").is_file():
        return out
    float_dir = work / "hf-float16"
    if not (float_dir / "config.json").is_file():
        shutil.rmtree(float_dir, ignore_errors=True)
        convert_gguf(gguf_path, float_dir, progress=True)
    subprocess.run([sys.executable, "-m", "quantserve.cli.main", "lite", "rtn", str(float_dir), "--w-bits", "4",
                    "--w-group-size", str(GROUP), "--work-dir", str(out)], check=True)
    shutil.rmtree(float_dir)                    # only needed to quantize
    return out


def build(key: str, s: dict, work: Path, skip: bool) -> tuple[dict[str, Path], Path]:
    """({llama.cpp type: its GGUF} for Q4_0 and Q4_K_M, our W4 g128 directory), made once and
    cached under `work`."""
    f16, w4 = work / "model.F16.gguf", work / f"w4-g{GROUP}"
    quants = {kind: work / f"model.{kind}.gguf" for kind in LLAMACPP_TYPES}
    if skip:
        missing = [p for p in (*quants.values(), w4 / "config.json") if not p.exists()]
        if missing:
            raise SystemExit(f"--skip-build: {missing[0]} is missing; run once without --skip-build")
        return quants, w4
    work.mkdir(parents=True, exist_ok=True)
    if not f16.exists():
        log(f"{key}: writing the random-weight F16 GGUF ({len(tensor_specs(s))} tensors) ...")
        write_gguf(s, f16)
    for kind, path in quants.items():
        if not path.exists():
            log(f"{key}: llama-quantize F16 -> {kind} ...")
            partial = path.with_name(path.name + ".partial")
            subprocess.run([tool("llama-quantize"), str(f16), str(partial), kind, str(THREADS)],
                           check=True, capture_output=True)
            partial.rename(path)
    if not (w4 / "config.json").is_file():
        log(f"{key}: quantserve GGUF -> float -> lite rtn W4 g{GROUP} ...")
    return quants, our_w4(f16, work)


def gguf_summary(gguf_path: Path) -> dict:
    """How many tensors of each ggml type the file holds, the output head's (or tied embedding's)
    type, and the bytes a batch-1 step reads: the whole file but an untied input embedding."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    lookup = int(tensors["token_embd.weight"].n_bytes) if "output.weight" in tensors else 0
    return {"types": dict(Counter(t.tensor_type.name for t in tensors.values())), "head": head.tensor_type.name,
            "step_read_gb": (gguf_path.stat().st_size - lookup) / 1e9}


def bench_ours(path: Path, repeats: int) -> dict:
    """engine_rates() on our W4 model, as bench_llamacpp measures its models; a batch-1 step reads
    every weight once, but an untied input embedding (only looked up)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    engine = Engine(path, EngineConfig(dtype="float16", session_len=1024, max_batch_size=STREAMS,
                                       num_threads=THREADS), progress=False)
    load_s = time.perf_counter() - start
    rates = engine_rates(engine, tokenizer, repeats=repeats, streams=STREAMS)
    model = engine.model
    held = [*model.embed.parameters(), *model.embed.buffers()]        # a quantized table holds buffers
    lookup = 0 if model.args.tie_word_embeddings else sum(t.nbytes for t in held)
    size, step = engine.weights_bytes / 1e9, (engine.weights_bytes - lookup) / 1e9
    del engine, model
    gc.collect()
    return {**rates, "weights_gb": size, "step_read_gb": step, "step_gb_s": step * rates["decode_b1_tok_s"],
            "load_s": load_s}


def bench_file(gguf_path: Path, work: Path, repeats: int) -> dict:
    """Ours on llama.cpp's own file at its own bits: converted afresh (the first load, timed), then
    bench_ours on the result (its engine load is the second)."""
    from quantserve.models.gguf import convert_gguf

    out = work / f"own-bits-{gguf_path.stem}"
    start = time.perf_counter()
    convert_gguf(gguf_path, out, progress=True, replace=True)
    first = time.perf_counter() - start
    summary = json.loads((out / "config.json").read_text())["quantization_config"]["gguf_types"]
    result = bench_ours(out, repeats)
    shutil.rmtree(out)
    return {**result, "first_load_s": first, "file_gb": gguf_path.stat().st_size / 1e9, "conversion": summary}


def measure(key: str, s: dict, quants: dict[str, Path], w4: Path, repeats: int) -> dict:
    """Both sides on one shape (llama.cpp on each of its types); the sizes and each file's tensor
    types with them. "llama.cpp" is its Q4_0 run, "llama.cpp Q4_K_M" the other."""
    log(f"{key}: quantserve W4 g{GROUP} ...")
    out = {"shape": s, "full_depth": s["layers"] == SHAPES[key]["layers"],
           "params": sum(int(np.prod(shape)) for _, shape, _ in tensor_specs(s)), "quantserve": bench_ours(w4, repeats)}
    log(f"{key}: quantserve {out['quantserve']}")
    for kind, path in quants.items():
        log(f"{key}: llama.cpp {kind} ...")
        theirs, info = bench_theirs(path)
        summary = gguf_summary(path)
        theirs.update(step_read_gb=summary["step_read_gb"],
                      step_gb_s=summary["step_read_gb"] * theirs["decode_b1_tok_s"])
        log(f"{key}: llama.cpp {kind} {theirs}")
        side = "llama.cpp" if kind == "Q4_0" else f"llama.cpp {kind}"
        out.update({side: theirs, f"{side} types": summary, "llama_bench_info": info})
        log(f"{key}: quantserve on the {kind} file ...")
        out[f"quantserve {kind} file"] = bench_file(path, w4.parent, repeats)
        log(f"{key}: quantserve {kind} file {out[f'quantserve {kind} file']}")
    out["llama.cpp_types"] = out.pop("llama.cpp types")
    return out


def markdown(results: dict, sides: dict, repeats: int) -> str:
    """One row per shape, in the style of bench_llamacpp's table."""
    rows = [f"quantserve: {sides['quantserve']}. llama.cpp: {sides['llama.cpp']}. {THREADS} threads, "
            f"best of {repeats}, random weights at the real models' dimensions.", "",
            f"| shape | params | step weights: ours W4 g{GROUP} vs Q4_0 (its head) | decode b=1 (ours / theirs) | ratio | "
            f"prefill 512 (ours / theirs) | ratio | {STREAMS} streams (ours / theirs) | ratio | "
            "step reads (ours / theirs) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        o, t, s = r["quantserve"], r["llama.cpp"], r["shape"]
        cells = [f"{o[k]:.1f} / {t[k]:.1f} | {ratio(o[k], t[k])}"
                 for k in ("decode_b1_tok_s", "prefill512_tok_s", f"decode_{STREAMS}_tok_s")]
        layers = "" if r["full_depth"] else f" ({s['layers']} of its layers)"
        rows.append(f"| {s['name']}{layers} | {r['params'] / 1e6:.0f} M | {o['step_read_gb']:.3f} vs "
                    f"{t['step_read_gb']:.3f} GB ({r['llama.cpp_types']['head']} head) | " + " | ".join(cells) +
                    f" | {o['step_gb_s']:.1f} / {t['step_gb_s']:.1f} GB/s |")
    for kind in ("Q4_0", "Q4_K_M"):
        rows += own_bits_rows(results, kind)
    rows += ["", "Decode batch 1: `llama-bench -n 128` vs our 128 new tokens after a 128-token prompt; prefill: "
             "`llama-bench -p 512` vs one 512-token prompt; "
             f"{STREAMS} streams: `llama-batched-bench -npp 128 -ntg 128 -npl {STREAMS}` (S_TG) vs {STREAMS} "
             "prompts of 128 decoded together. Sizes: the weights a batch-1 step reads (an untied input "
             "embedding is only looked up, so left out); step reads: those bytes x steps/s. For the mixture "
             "of experts (Qwen3-30B-A3B) a step reads only the experts its tokens pick (8 of 128 a token), "
             "so its sizes and GB/s count weights a step does not read."]
    return "\n".join(rows) + "\n"


def own_bits_rows(results: dict, kind: str) -> list[str]:
    """Ours reading llama.cpp's own file at its own bits, against llama.cpp on that file."""
    side = "llama.cpp" if kind == "Q4_0" else f"llama.cpp {kind}"
    rows = ["", f"Ours on llama.cpp's own {kind} file, read at its own bits, against llama.cpp on the same file"
            + (f" (issue 18's targets: batch 1 >= 1.0x, {STREAMS} streams >= 2x)" if kind == "Q4_K_M" else "") + ":",
            "", f"| shape | file | our weights in memory (x file) | first / second load | decode b=1 (ours / theirs) "
            f"| ratio | prefill 512 (ours / theirs) | ratio | {STREAMS} streams (ours / theirs) | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        if f"quantserve {kind} file" not in r:
            continue
        o, t = r[f"quantserve {kind} file"], r[side]
        cells = [f"{o[k]:.1f} / {t[k]:.1f} | {ratio(o[k], t[k])}"
                 for k in ("decode_b1_tok_s", "prefill512_tok_s", f"decode_{STREAMS}_tok_s")]
        layers = "" if r["full_depth"] else f" ({r['shape']['layers']} of its layers)"
        rows.append(f"| {r['shape']['name']}{layers} | {o['file_gb']:.3f} GB | {o['weights_gb']:.3f} GB "
                    f"({o['weights_gb'] / o['file_gb']:.2f}x) | {o['first_load_s']:.0f} s / {o['load_s']:.1f} s | "
                    + " | ".join(cells) + " |")
    conversions = {r["shape"]["name"]: r[f"quantserve {kind} file"]["conversion"] for r in results.values()
                   if f"quantserve {kind} file" in r}
    rows += ["", "What each file's tensor types became: " + "; ".join(
        f"{name}: " + ", ".join(f"{c['tensors']} {t} -> {c['bits']}-bit"
                                + (f" (+{100 * c['max_rel_rms_error']:.2f}% rms)" if c["max_rel_rms_error"] else "")
                                for t, c in sorted(conv.items())) for name, conv in conversions.items())]
    return rows


def plot(results: dict, path: Path) -> None:
    """Bars of the ratios ours / theirs, one group per measure, one bar per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("decode_b1_tok_s", "decode b=1"), ("prefill512_tok_s", "prefill 512"),
               (f"decode_{STREAMS}_tok_s", f"{STREAMS} streams")]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(metrics))
    width = 0.8 / len(results)
    for i, r in enumerate(results.values()):
        values = [r["quantserve"][k] / r["llama.cpp"][k] for k, _ in metrics]
        label = r["shape"]["name"] + ("" if r["full_depth"] else f" ({r['shape']['layers']} layers)")
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [label for _, label in metrics])
    ax.set_ylabel(f"quantserve W4 g{GROUP} / llama.cpp Q4_0")
    ax.set_title(f"Real models' shapes, random weights; {THREADS} threads, {cpu_name()}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Build (or reuse) each shape's two models, measure both sides, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=REPEATS, help="best of this many runs, both sides")
    p.add_argument("--skip-build", action="store_true", help="use the cached models; fail if one is missing")
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)   # smoke runs: fewer layers
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    bench_llamacpp.REPEATS = args.repeats        # llama_bench() / batched() read it at call time
    results = {}
    for key in args.shapes:
        s = dict(SHAPES[key], layers=args.layers or SHAPES[key].get("bench_layers", SHAPES[key]["layers"]))
        tag = key if args.layers is None else f"{key}-{args.layers}layers"
        work = envs.quantserve_home() / "work" / "shapes" / tag
        quants, w4 = build(key, s, work, args.skip_build)
        results[tag] = measure(key, s, quants, w4, args.repeats)
    sides = {"quantserve": f"kernels {kernels.describe()}",
             "llama.cpp": f"{llamacpp_isa()}; machine {cpu_name()}"}
    RESULTS.mkdir(exist_ok=True)
    stem = "shapes" if args.layers is None else f"shapes-{args.layers}layers"    # a smoke run keeps the table
    if (RESULTS / f"{stem}.json").exists() and set(args.shapes) != set(SHAPES):   # some shapes: update their rows
        merged = {**json.loads((RESULTS / f"{stem}.json").read_text())["results"], **results}
        results = {key: merged[key] for key in SHAPES if key in merged}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"results": results, "sides": sides, "threads": THREADS,
                                                      "args": vars(args)}, indent=2))
    text = markdown(results, sides, args.repeats)
    (RESULTS / f"{stem}.md").write_text(text)
    try_plot(plot, results, RESULTS / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
