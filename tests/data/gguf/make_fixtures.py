"""Build the GGUF fixtures of tests/test_gguf_types.py with llama.cpp's own tools (run by hand, once;
the files are committed so the tests need no llama.cpp):

    python tests/data/gguf/make_fixtures.py [path/to/llama.cpp/bin]   (default: ../shared/tools/llamacpp.sh)

A random Llama (hidden 256 so that K-quant super-blocks fit, 2 layers, byte-level vocabulary) is
written as an F32 GGUF, then `llama-quantize` makes one file per tensor type (`--pure`, the
embedding and output at that type too) and a Q4_K_M (its own mix: some tensors at Q6_K). For each,
`llama-perplexity --kl-divergence-base` records its log-probabilities over a fixed text (the top
ones at every scored position): reference.json, which the tests check quantserve against.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from test_gguf import QT, _tokens, write_gguf  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
CTX, CHUNKS, TOP = 64, 2, 8
TEXT = ("The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore; the shells "
        "she sells are sea shells, I'm sure. Peter Piper picked a peck of pickled peppers. How much wood "
        "would a woodchuck chuck if a woodchuck could chuck wood? ") * 3


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(_tokens()), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():     # spread enough that the logits are not flat, norms around 1
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.2 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0))
    return model.eval()


def llama_cpp_reference(bin_dir: Path, gguf_path: Path, text: Path, work: Path) -> dict:
    """llama-perplexity's saved log-probabilities (--kl-divergence-base): for each chunk of CTX tokens,
    the tokens and, at every scored position (the second half), the TOP most likely next tokens."""
    saved = work / f"{gguf_path.stem}.kld"
    subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf_path), "-f", str(text), "-c", str(CTX),
                    "-b", str(CTX), "--chunks", str(CHUNKS), "-t", "2", "--kl-divergence-base", str(saved)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = saved.read_bytes()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(data, np.int32, 3, 8)
    tokens = np.frombuffer(data, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    row = 2 * ((n_vocab + 1) // 2) + 4                       # uint16s a row: scale, min (2 floats), then values
    first, scored = n_ctx // 2, n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(data, np.uint16, n_chunk * scored * row, 20 + 4 * tokens.size).reshape(n_chunk, scored, row)
    chunks = []
    for c in range(n_chunk):
        scale, low = rows[c, :, :4].copy().view(np.float32).T          # [scored] each
        logp = low[:, None] + scale[:, None] * rows[c, :, 4:4 + n_vocab]  # [scored, V]; code 0 means <= low
        top = np.argsort(-logp, axis=1)[:, :TOP]
        chunks.append({"tokens": tokens[c].tolist(), "first": int(first),
                       "top": [[[int(t), round(float(logp[i, t]), 5)] for t in top[i]] for i in range(scored)]})
    return {"chunks": chunks}


def main() -> None:
    if len(sys.argv) > 1:
        bin_dir = Path(sys.argv[1])
    else:
        script = HERE.parents[2].parent / "shared" / "tools" / "llamacpp.sh"
        bin_dir = Path(subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip())
    reference = {"files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(tiny_model(), Path(tmp) / "tiny-F32.gguf", "llama", QT.F32)
        text = Path(tmp) / "text.txt"
        text.write_text(TEXT)
        for kind in TYPES + ["Q4_K_M"]:
            out = HERE / f"tiny-{kind}.gguf"
            pure = [] if kind == "Q4_K_M" else ["--pure", "--output-tensor-type", kind.lower(),
                                               "--token-embedding-type", kind.lower()]
            subprocess.run([str(bin_dir / "llama-quantize"), *pure, str(f32), str(out), kind, "2"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            reference["files"][out.name] = llama_cpp_reference(bin_dir, out, text, Path(tmp))
            print(f"{out.name}: {out.stat().st_size} bytes", file=sys.stderr)
    (HERE / "reference.json").write_text(json.dumps(reference) + "\n")


if __name__ == "__main__":
    main()
