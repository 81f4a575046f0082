"""Batch-1 decode rate with and without n-gram speculative decoding (`--speculative ngram`).

    python benchmarks/bench_speculative.py            # default model, under a minute on 2 quiet cores

Two greedy chat workloads on the default model: a code edit (a ~60-line Python function, asked
to rename a variable and add a docstring, so the answer copies most of its input) and a
summary of a ~300-word report. Each runs on the plain engine and on one with
`speculative="ngram", num_speculative_tokens=4`; decode tokens/s is the new tokens after the
first over the time after the first (prefill excluded), best of 2 runs. The outputs are compared
token for token. Writes benchmarks/results/speculative.json and speculative.md.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_llamacpp import llamacpp_isa  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

RESULTS = Path(__file__).with_name("results")
REPEATS = 2

CODE = '''def summarize_orders(orders, tax_rate, discounts=None):
    total = 0
    count = 0
    skipped = []
    by_customer = {}
    for order in orders:
        if order.get("cancelled"):
            skipped.append(order["id"])
            continue
        price = order["price"]
        quantity = order["quantity"]
        line = price * quantity
        if discounts and order["sku"] in discounts:
            line = line * (1 - discounts[order["sku"]])
        line = line * (1 + tax_rate)
        total = total + line
        count = count + 1
        customer = order["customer"]
        if customer not in by_customer:
            by_customer[customer] = 0
        by_customer[customer] = by_customer[customer] + line
    if count == 0:
        return {"total": 0, "count": 0, "average": 0, "skipped": skipped, "top": None}
    average = total / count
    top = None
    top_amount = 0
    for customer, amount in by_customer.items():
        if amount > top_amount:
            top = customer
            top_amount = amount
    report = {
        "total": round(total, 2),
        "count": count,
        "average": round(average, 2),
        "skipped": skipped,
        "top": top,
        "top_amount": round(top_amount, 2),
    }
    if total > 10000:
        report["tier"] = "gold"
    elif total > 1000:
        report["tier"] = "silver"
    else:
        report["tier"] = "bronze"
    lines = []
    for customer in sorted(by_customer):
        amount = by_customer[customer]
        share = amount / total
        lines.append(f"{customer}: {amount:.2f} ({share:.1%})")
    report["lines"] = lines
    largest = max(by_customer.values())
    smallest = min(by_customer.values())
    report["spread"] = round(largest - smallest, 2)
    report["customers"] = len(by_customer)
    if skipped:
        report["note"] = f"{len(skipped)} cancelled orders were skipped"
    else:
        report["note"] = "no cancelled orders"
    return report
'''

REPORT = ("The city council met on Tuesday to review the first year of the new public transport plan. "
          "Ridership on the tram network rose by 18 percent, driven mostly by the two new lines that connect "
          "the northern suburbs with the university and the central station. Bus ridership fell slightly, by "
          "3 percent, as several routes were shortened to feed the tram stops instead of running into the "
          "centre. The council noted that the night buses introduced in March were used far more than expected, "
          "with an average of 1,200 passengers per night, and agreed to extend the service to Sundays. Costs were "
          "4 percent over the budget, mainly because of higher electricity prices and the overtime paid during "
          "the summer works on the bridge. Fare revenue covered 41 percent of operating costs, up from 37 percent "
          "the year before. Residents' associations asked for better lighting at the tram stops and for more "
          "bicycle parking near the central station; the council asked the transport department to present "
          "costed proposals for both by the end of the year. The next review is planned for the autumn, when the "
          "effect of the new fare zones introduced in September can be measured.")

WORKLOADS = {
    "code edit": ("Rename the variable `total` to `grand_total` in this function and add a docstring. "
                  "Reply with the complete new function only.\n\n```python\n" + CODE + "```", 400),
    "summary": ("Summarise this report in five sentences, keeping its figures.\n\n" + REPORT, 160),
}


def decode_run(engine: Engine, prompt: list[int], new: int, eos: tuple[int, ...]) -> tuple[float, list[int]]:
    """(decode tokens/s after the first token, the output: greedy, to EOS or `new` tokens)."""
    request = engine.add_request("bench", prompt, SamplingParams(max_new_tokens=new, eos_token_ids=eos))
    while not request.output_token_ids:
        engine.step()
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return (len(request.output_token_ids) - 1) / (time.perf_counter() - start), request.output_token_ids


def measure(model_dir: Path, prompts: dict, eos: tuple[int, ...], **spec) -> dict:
    engine = Engine(model_dir, EngineConfig(session_len=2048, **spec), progress=False)
    decode_run(engine, prompts["summary"][0][:64], 8, eos)                      # warm-up
    out = {}
    for name, (prompt, new) in prompts.items():
        before = engine.stats()
        runs = [decode_run(engine, prompt, new, eos) for _ in range(REPEATS)]
        after = engine.stats()
        drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        out[name] = {"tok_s": max(r[0] for r in runs), "tokens": runs[0][1], "new": len(runs[0][1]),
                     "acceptance": accepted / drafted if drafted else None,
                     "accepted_per_step": accepted / max(1, after.spec_num_drafts - before.spec_num_drafts)}
    out["kernels"] = engine.kernel_backend()
    return out


def llamacpp_run(gguf: Path, prompts: dict, spec: list[str]) -> dict:
    """llama.cpp's own llama-server on the shipped GGUF, one slot, the same token ids, greedy:
    its reported decode rate (`timings.predicted_per_second`), best of REPEATS."""
    import subprocess

    import httpx

    from benchmarks.bench_llamacpp import THREADS, free_port, tool, wait_ready

    port = free_port()
    log = open(RESULTS / f"server-spec-{port}.log", "w")
    proc = subprocess.Popen([tool("llama-server"), "-m", str(gguf), "-t", str(THREADS), "-np", "1", "-c", "2048",
                             "--port", str(port), "--host", "127.0.0.1", *spec], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        out = {}
        for name, (prompt, new) in prompts.items():
            body = {"prompt": prompt, "n_predict": new, "temperature": 0, "cache_prompt": False}
            runs = [httpx.post(f"{url}/completion", json=body, timeout=600).json() for _ in range(REPEATS)]
            timings = max((r["timings"] for r in runs), key=lambda t: t["predicted_per_second"])
            out[name] = {"tok_s": timings["predicted_per_second"], "new": timings["predicted_n"],
                         "accepted": timings.get("draft_n_accepted"), "drafted": timings.get("draft_n")}
        return out
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def llamacpp_rows(prompts: dict) -> list[dict]:
    """llama.cpp plain against its n-gram drafting (`--spec-type ngram-simple`, 4 tokens)."""
    from quantserve import envs
    from quantserve.models.resolve import _default_gguf

    gguf = _default_gguf(envs.quantserve_home() / "downloads", progress=False)      # the shipped Q4_1 file
    plain = llamacpp_run(gguf, prompts, [])
    spec = llamacpp_run(gguf, prompts, ["--spec-type", "ngram-simple", "--spec-draft-n-max", "4"])
    return [{"workload": name, "plain_tok_s": plain[name]["tok_s"], "ngram_tok_s": spec[name]["tok_s"],
             "speedup": spec[name]["tok_s"] / plain[name]["tok_s"], "new_tokens": spec[name]["new"],
             "drafted": spec[name]["drafted"], "accepted": spec[name]["accepted"]} for name in prompts]


def main() -> None:
    from transformers import AutoTokenizer

    model_dir = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,  # noqa: E731
                                                tokenize=False)
    prompts = {name: (tok.encode(chat(text), add_special_tokens=False), new) for name, (text, new) in WORKLOADS.items()}
    eos = (tok.eos_token_id,)
    plain = measure(model_dir, prompts, eos)
    spec = measure(model_dir, prompts, eos, speculative="ngram", num_speculative_tokens=4)
    rows = []
    for name in WORKLOADS:
        p, s = plain[name], spec[name]
        rows.append({"workload": name, "prompt_tokens": len(prompts[name][0]), "new_tokens": p["new"],
                     "plain_tok_s": p["tok_s"], "ngram_tok_s": s["tok_s"], "speedup": s["tok_s"] / p["tok_s"],
                     "acceptance": s["acceptance"], "accepted_per_step": s["accepted_per_step"],
                     "identical": p["tokens"] == s["tokens"]})
        print(f"{name}: plain {p['tok_s']:.1f} tok/s, ngram {s['tok_s']:.1f} tok/s "
              f"({s['tok_s'] / p['tok_s']:.2f}x), identical {p['tokens'] == s['tokens']}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    theirs = llamacpp_rows(prompts)
    (RESULTS / "speculative.json").write_text(json.dumps({"kernels": plain["kernels"], "rows": rows,
                                                          "llamacpp": theirs}, indent=1))
    lines = ["| workload | prompt tokens | new tokens | plain tok/s | ngram K=4 tok/s | speed-up | drafted tokens "
             "accepted | accepted per verify step | same tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        lines.append(f"| {r['workload']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['plain_tok_s']:.1f} | "
                     f"{r['ngram_tok_s']:.1f} | {r['speedup']:.2f}x | {acc} | {r['accepted_per_step']:.2f} | "
                     f"{'yes' if r['identical'] else 'no'} |")
    lines += ["", "llama.cpp's own `llama-server` (one slot) on the shipped Q4_1 file, the same token ids, greedy, "
              "plain against `--spec-type ngram-simple --spec-draft-n-max 4`, its reported decode rate:", "",
              "| workload | llama.cpp plain tok/s | llama.cpp ngram tok/s | its speed-up | its drafts accepted | "
              "quantserve ngram / llama.cpp ngram |", "|---|---:|---:|---:|---:|---:|"]
    for ours, t in zip(rows, theirs):
        acc = f"{t['accepted'] / t['drafted']:.0%}" if t["drafted"] else "-"
        lines.append(f"| {t['workload']} | {t['plain_tok_s']:.1f} | {t['ngram_tok_s']:.1f} | {t['speedup']:.2f}x | "
                     f"{acc} | **{ours['ngram_tok_s'] / t['ngram_tok_s']:.2f}x** |")
    (RESULTS / "speculative.md").write_text("\n".join(lines) + f"\n\nMachine {cpu_name()}, every run; quantserve "
                                                              f"kernels: {plain['kernels']}; llama.cpp: "
                                                              f"{llamacpp_isa()}.\n")


if __name__ == "__main__":
    main()
