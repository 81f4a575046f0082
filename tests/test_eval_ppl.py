"""`quantserve eval ppl` follows the papers' protocol: equal to transformers' perplexity on the
same windows; any text file as dataset; JSON output."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import torch


def test_perplexity_equals_transformers_on_the_same_windows(tiny_chat_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. def f(x): return x * 2\n" * 40)
    done = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "eval", "ppl", str(tiny_chat_model),
                           "--dataset", str(text), "--seqlen", "64", "--max-samples", "3", "--dtype", "float32",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["windows"] == 3 and report["tokens"] == 3 * 63

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, torch_dtype=torch.float32).eval()
    ids = tok(text.read_text(), return_tensors="pt").input_ids[0]
    nll = []
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 64:(w + 1) * 64].unsqueeze(0)
            nll.append(float(model(window, labels=window).loss))
    assert math.isclose(report["ppl"], math.exp(sum(nll) / 3), rel_tol=1e-3)
