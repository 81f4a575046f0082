"""Time to first token per turn: a 6-turn conversation on one WebSocket session vs stateless requests.

    python benchmarks/bench_ws_session.py                # about 1.5 minutes on 2 quiet cores

Starts `quantserve serve api_server` on the default model (--session-len 1024, a 1,536-token KV
cache: 24 blocks of 64, of which 8 may be pinned by sessions). The conversation: a system
prompt holding a ~200-token document, then 6 questions, greedy, 24 new tokens each. It runs
four ways: on one session (`WS /v1/sessions/ws`), and as stateless streamed
`/v1/chat/completions` calls each carrying the whole history (the replies the calls gave),
first on a quiet server, then with other traffic between turns: two unrelated 800-word
prompts that between them pass through every unpinned block of the cache. The prefix cache is
on throughout, so a quiet server serves the stateless calls' history from cached blocks too;
traffic evicts those, not the session's pinned ones. Before each run the same traffic empties
the cache, so each run starts cold. TTFT is measured by the client, from sending a turn to its
first text; each figure is the best of --repeats runs. Writes results/ws_session.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import TEXT  # noqa: E402
from benchmarks.soak import WORDS, cpu_name, free_port, start_server  # noqa: E402
from quantserve.bench.results import plot_curve, try_plot  # noqa: E402
from quantserve.models.resolve import resolve_model  # noqa: E402

RESULTS = Path(__file__).with_name("results")
SERVER_ARGS = "--session-len 1024 --cache-max-tokens 1536"
SYSTEM = "Answer in one short sentence, from this document.\n\n" + TEXT * 4
QUESTIONS = ["Where did the city begin?", "What did the traders exchange?", "What did it grow into?",
             "What drew the students?", "Which workshops are named?", "Summarise the document in five words."]
MAX_TOKENS = 24
MODES = ("session, quiet", "stateless, quiet", "session, busy", "stateless, busy")


class Client:
    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.http = httpx.Client(base_url=url, timeout=300)
        self.traffic = 0

    def other_traffic(self) -> None:
        """Two unrelated prompts, never seen before, that between them pass through the whole cache."""
        for _ in range(2):
            self.traffic += 1
            rng = random.Random(self.traffic)
            prompt = f"Note {self.traffic}: " + " ".join(rng.choice(WORDS) for _ in range(800))
            r = self.http.post("/v1/completions", json={"model": self.model, "prompt": prompt, "max_tokens": 1})
            r.raise_for_status()

    def session(self, busy: bool) -> list[dict]:
        """The conversation on one session: per turn TTFT (ms), prompt and cached tokens."""
        turns = []
        with connect(self.url.replace("http", "ws") + "/v1/sessions/ws", max_size=None) as ws:
            ws.send(json.dumps({"type": "session.start", "model": self.model, "system": SYSTEM, "temperature": 0,
                                "max_tokens": MAX_TOKENS}))
            json.loads(ws.recv())
            for question in QUESTIONS:
                if busy and turns:
                    self.other_traffic()
                start, first = time.perf_counter(), None
                ws.send(json.dumps({"type": "request", "content": question}))
                while (event := json.loads(ws.recv()))["type"] == "delta":
                    first = first or time.perf_counter()
                if event["type"] != "done":
                    raise SystemExit(f"the session failed: {event}")
                turns.append(turn_row(start, first, event["usage"]["prompt_tokens"], event["usage"]["cached_tokens"]))
        return turns

    def stateless(self, busy: bool) -> list[dict]:
        """The same conversation as streamed chat completions, each carrying the whole history."""
        history, turns = [{"role": "system", "content": SYSTEM}], []
        for question in QUESTIONS:
            if busy and turns:
                self.other_traffic()
            history.append({"role": "user", "content": question})
            body = {"model": self.model, "messages": history, "temperature": 0, "max_tokens": MAX_TOKENS,
                    "stream": True, "stream_options": {"include_usage": True}}
            start, first, text, usage = time.perf_counter(), None, "", None
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                    first = first or (time.perf_counter() if content else None)
                    text += content or ""
                    usage = chunk.get("usage") or usage
            history.append({"role": "assistant", "content": text})
            turns.append(turn_row(start, first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        return turns


def turn_row(start: float, first: float | None, prompt: int, cached: int) -> dict:
    return {"ttft_ms": ((first or time.perf_counter()) - start) * 1e3, "prompt_tokens": prompt, "cached_tokens": cached}


def log(msg: str) -> None:
    print(f"[ws_session] {msg}", file=sys.stderr, flush=True)


def measure(client: Client, repeats: int) -> dict[str, list[dict]]:
    """Every mode `repeats` times, each from an emptied cache; per turn, the run with the best TTFT."""
    best: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for mode in MODES:
            log(f"run {rep + 1}/{repeats}: {mode}")
            client.other_traffic()
            runs = (client.session if mode.startswith("session") else client.stateless)(mode.endswith("busy"))
            best[mode] = [min(pair, key=lambda t: t["ttft_ms"]) for pair in zip(best.get(mode, runs), runs)]
    return best


def table(best: dict[str, list[dict]]) -> str:
    head = "| turn | prompt tokens | " + " | ".join(MODES) + " |\n|---:|---:|" + "---:|" * len(MODES) + "\n"
    rows = []
    for i in range(len(QUESTIONS)):
        cells = [f"{best[m][i]['ttft_ms']:.0f} ms ({best[m][i]['cached_tokens']} cached)" for m in MODES]
        rows.append(f"| {i + 1} | {best[MODES[0]][i]['prompt_tokens']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    port = free_port()
    server = start_server(SimpleNamespace(results=RESULTS, quant_policy="0", server_args=SERVER_ARGS),
                          resolve_model(None), port, name="smol")
    try:
        client = Client(f"http://127.0.0.1:{port}", "smol")
        best = measure(client, args.repeats)
    finally:
        server.terminate()
        server.wait(30)
    md = f"Default model (SmolLM2-135M-Instruct, float16), {cpu_name()}; best of {args.repeats}.\n\n" + table(best)
    (RESULTS / "ws_session.json").write_text(json.dumps({"cpu": cpu_name(), "server_args": SERVER_ARGS,
                                                         "repeats": args.repeats, "turns": best}, indent=1))
    (RESULTS / "ws_session.md").write_text(md)
    rows = [{"turn": i + 1, **{m: best[m][i]["ttft_ms"] for m in MODES}} for i in range(len(QUESTIONS))]
    try_plot(plot_curve, rows, "turn", [(m, m) for m in MODES], "turn", "TTFT per turn (ms)",
             str(RESULTS / "ws_session.png"), "TTFT (ms)")
    print(md)


if __name__ == "__main__":
    main()
