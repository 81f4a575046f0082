"""Batch-1 decode rate with and without speculative decoding: n-gram drafts (`--speculative ngram`)
and a draft model (`--speculative-model`).

    python benchmarks/bench_speculative.py            # default model, a few minutes on 2 quiet cores

Two greedy chat workloads on the default model: a code edit (a ~60-line Python function, asked
to rename a variable and add a docstring, so the answer copies most of its input) and a
summary of a ~300-word report. Each runs on the plain engine, on one with
`speculative="ngram", num_speculative_tokens=4`, and on one drafting with the shipped Q4_1 file
run at its own 4 bits (a 4-bit copy of the same model: the only real checkpoint of this
vocabulary that is here); decode tokens/s is the new tokens after the first over the time after
the first (prefill excluded), best of 2 runs. The outputs are compared token for token. llama.cpp's
own llama-server runs the same token ids in the same run: plain and n-gram on the Q4_1 file; plain
and drafting with the Q4_1 file on an F16 copy of it (llama-quantize), as quantserve's float16
default model. Writes benchmarks/results/speculative.json and speculative.md.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_llamacpp import llamacpp_isa  # noqa: E402
from benchmarks.soak import cpu_name  # noqa: E402
from quantserve.bench.results import try_plot  # noqa: E402
from quantserve.config import EngineConfig, SamplingParams  # noqa: E402
from quantserve.engine.engine import Engine  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

RESULTS = Path(__file__).with_name("results")
REPEATS = 2
DRAFT_K = 4                 # tokens drafted per step, both sides
DRAFT_P_MIN = 0.0           # no confidence floor, both sides (llama.cpp's default)

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


def f16_copy(gguf: Path) -> Path:
    """An F16 GGUF of the same weights, written once by llama.cpp's own llama-quantize."""
    import subprocess

    from benchmarks.bench_llamacpp import tool

    out = gguf.with_name(f"{gguf.stem}.F16.gguf")            # beside it, in quantserve's cache
    if not out.is_file():
        subprocess.run([tool("llama-quantize"), "--allow-requantize", str(gguf), str(out), "F16"], check=True,
                       capture_output=True)
    return out


def llamacpp_rows(prompts: dict, gguf: Path) -> dict[str, list[dict]]:
    """llama.cpp plain against its n-gram drafting (`--spec-type ngram-simple`, 4 tokens) on the
    Q4_1 file; and plain against drafting with the Q4_1 file (`--spec-type draft-simple`) on F16."""
    f16 = f16_copy(gguf)
    runs = {"plain": llamacpp_run(gguf, prompts, []),
            "ngram": llamacpp_run(gguf, prompts, ["--spec-type", "ngram-simple", "--spec-draft-n-max", "4"]),
            "f16": llamacpp_run(f16, prompts, []),
            "draft": llamacpp_run(f16, prompts, ["--spec-type", "draft-simple", "--spec-draft-model", str(gguf),
                                                 "--spec-draft-n-max", str(DRAFT_K),
                                                 "--spec-draft-p-min", str(DRAFT_P_MIN)])}
    out = {}
    for kind, base in (("ngram", "plain"), ("draft", "f16")):
        out[kind] = [{"workload": name, "plain_tok_s": runs[base][name]["tok_s"], "spec_tok_s": runs[kind][name]["tok_s"],
                      "speedup": runs[kind][name]["tok_s"] / runs[base][name]["tok_s"],
                      "new_tokens": runs[kind][name]["new"], "drafted": runs[kind][name]["drafted"],
                      "accepted": runs[kind][name]["accepted"]} for name in prompts]
    return out


def compare(prompts: dict, plain: dict, spec: dict, label: str) -> list[dict]:
    rows = []
    for name in prompts:
        p, s = plain[name], spec[name]
        rows.append({"workload": name, "prompt_tokens": len(prompts[name][0]), "new_tokens": p["new"],
                     "plain_tok_s": p["tok_s"], "spec_tok_s": s["tok_s"], "speedup": s["tok_s"] / p["tok_s"],
                     "acceptance": s["acceptance"], "accepted_per_step": s["accepted_per_step"],
                     "identical": p["tokens"] == s["tokens"]})
        print(f"{name}: plain {p['tok_s']:.1f} tok/s, {label} {s['tok_s']:.1f} tok/s "
              f"({s['tok_s'] / p['tok_s']:.2f}x), identical {p['tokens'] == s['tokens']}", file=sys.stderr)
    return rows


def table(rows: list[dict], theirs: list[dict], label: str, their_setup: str) -> list[str]:
    lines = [f"| workload | prompt tokens | new tokens | plain tok/s | {label} tok/s | speed-up | drafted tokens "
             "accepted | accepted per verify step | same tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        lines.append(f"| {r['workload']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['plain_tok_s']:.1f} | "
                     f"{r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {acc} | {r['accepted_per_step']:.2f} | "
                     f"{'yes' if r['identical'] else 'no'} |")
    lines += ["", f"llama.cpp's own `llama-server` (one slot), the same token ids, greedy, {their_setup}, its "
              "reported decode rate:", "",
              f"| workload | llama.cpp plain tok/s | llama.cpp {label} tok/s | its speed-up | its drafts accepted | "
              f"quantserve {label} / llama.cpp {label} |", "|---|---:|---:|---:|---:|---:|"]
    for ours, t in zip(rows, theirs):
        acc = f"{t['accepted'] / t['drafted']:.0%}" if t["drafted"] else "-"
        lines.append(f"| {t['workload']} | {t['plain_tok_s']:.1f} | {t['spec_tok_s']:.1f} | {t['speedup']:.2f}x | "
                     f"{acc} | **{ours['spec_tok_s'] / t['spec_tok_s']:.2f}x** |")
    return lines


def plot(ngram: list[dict], draft: list[dict], theirs: dict, path: Path) -> None:
    """Grouped bars: decode tok/s per workload, quantserve's three ways beside llama.cpp's."""
    from quantserve.bench.results import _pyplot

    plt = _pyplot()
    bars = [("quantserve plain", [r["plain_tok_s"] for r in ngram]), ("quantserve ngram", [r["spec_tok_s"] for r in ngram]),
            ("quantserve draft model", [r["spec_tok_s"] for r in draft]),
            ("llama.cpp Q4_1 plain", [r["plain_tok_s"] for r in theirs["ngram"]]),
            ("llama.cpp Q4_1 ngram", [r["spec_tok_s"] for r in theirs["ngram"]]),
            ("llama.cpp F16 plain", [r["plain_tok_s"] for r in theirs["draft"]]),
            ("llama.cpp F16 + Q4_1 draft", [r["spec_tok_s"] for r in theirs["draft"]])]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        ax.bar([w + i * width for w in range(len(ngram))], values, width, label=label)
    ax.set_xticks([w + 0.4 - width / 2 for w in range(len(ngram))], [r["workload"] for r in ngram])
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from transformers import AutoTokenizer

    from quantserve import envs
    from quantserve.models.resolve import _default_gguf

    model_dir = resolve_model(None)
    gguf = _default_gguf(envs.quantserve_home() / "downloads", progress=False)      # the shipped Q4_1 file
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,  # noqa: E731
                                                tokenize=False)
    prompts = {name: (tok.encode(chat(text), add_special_tokens=False), new) for name, (text, new) in WORKLOADS.items()}
    eos = (tok.eos_token_id,)
    plain = measure(model_dir, prompts, eos)
    ngram = compare(prompts, plain, measure(model_dir, prompts, eos, speculative="ngram", num_speculative_tokens=4),
                    "ngram")
    draft = compare(prompts, plain, measure(model_dir, prompts, eos, speculative_model=str(gguf),
                                            num_speculative_tokens=DRAFT_K, draft_p_min=DRAFT_P_MIN), "draft model")
    RESULTS.mkdir(exist_ok=True)
    theirs = llamacpp_rows(prompts, gguf)
    (RESULTS / "speculative.json").write_text(json.dumps({"kernels": plain["kernels"], "ngram": ngram,
                                                          "draft_model": draft, "llamacpp": theirs}, indent=1))
    try_plot(plot, ngram, draft, theirs, RESULTS / "speculative.png")
    lines = ["n-gram drafts, K = 4:", "", *table(ngram, theirs["ngram"], "ngram", "plain against `--spec-type "
                                                   "ngram-simple --spec-draft-n-max 4` on the shipped Q4_1 file"),
             "", f"A draft model, K = {DRAFT_K}, no confidence floor: quantserve's float16 default model drafted by "
             "the shipped Q4_1 file at its own bits:", "",
             *table(draft, theirs["draft"], "draft model", f"an F16 copy of the file drafted by the Q4_1 file "
                    f"(`--spec-type draft-simple --spec-draft-n-max {DRAFT_K} --spec-draft-p-min {DRAFT_P_MIN}`)")]
    (RESULTS / "speculative.md").write_text("\n".join(lines) + f"\n\nMachine {cpu_name()}, every run; quantserve "
                                                              f"kernels: {plain['kernels']}; llama.cpp: "
                                                              f"{llamacpp_isa()}.\n")


if __name__ == "__main__":
    main()
