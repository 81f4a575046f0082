"""`quantserve bench throughput|latency|serving` on small workloads: the counts they report are
the work that was done, the files are written, and bad input is a one-line error."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from quantserve.cli.main import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def written(tmp_path, kind: str) -> tuple[list[dict], list[dict]]:
    (json_path,) = tmp_path.glob(f"{kind}-*.json")
    (csv_path,) = tmp_path.glob(f"{kind}-*.csv")
    with open(csv_path) as f:
        return json.loads(json_path.read_text()), list(csv.DictReader(f))


ENGINE = ["--dtype", "float32", "--cache-max-tokens", "4096", "--no-progress"]


def test_throughput_runs_every_request_to_its_length(tiny_server_model, tmp_path, capsys):
    code, out, _ = run_cli(["bench", "throughput", str(tiny_server_model), "--num-prompts", "6", "--input-len", "20",
                            "--output-len", "7", "--concurrency", "4", "--output-dir", str(tmp_path), *ENGINE], capsys)
    assert code == 0 and "output tok/s" in out
    (row,), (csv_row,) = written(tmp_path, "throughput")
    assert row["num_prompts"] == 6 and row["output_tokens"] == 6 * 7 and row["input_tokens"] == 6 * 20
    assert row["output_tokens_per_s"] == pytest.approx(row["output_tokens"] / row["elapsed_s"])
    assert float(csv_row["requests_per_s"]) == pytest.approx(row["requests_per_s"])


def test_latency_grid_has_a_row_per_point_and_a_plot(tiny_server_model, tmp_path, capsys):
    code, out, _ = run_cli(["bench", "latency", str(tiny_server_model), "--batch-size", "1", "3", "--input-len", "16,32",
                            "--output-len", "5", "--output-dir", str(tmp_path), *ENGINE], capsys)
    assert code == 0 and "decode tok/s" in out
    rows, csv_rows = written(tmp_path, "latency")
    assert [(r["batch"], r["input_len"]) for r in rows] == [(1, 16), (1, 32), (3, 16), (3, 32)]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["weights_gb"] > 0 for r in rows)
    assert len(csv_rows) == 4 and next(tmp_path.glob("latency-*.png")).stat().st_size > 10_000


def test_serving_against_a_live_server(tiny_server, tiny_server_model, tmp_path, capsys):
    before = tiny_server.engine.stats()
    code, out, _ = run_cli(["bench", "serving", "--base-url", tiny_server.url + "/v1", "--tokenizer",
                            str(tiny_server_model), "--num-prompts", "8", "--input-len", "24", "--output-len", "6",
                            "--concurrency", "1", "4", "--output-dir", str(tmp_path), "--no-progress"], capsys)
    assert code == 0 and "TTFT p50 ms" in out
    rows, csv_rows = written(tmp_path, "serving")
    assert [r["concurrency"] for r in rows] == [1, 4] and len(csv_rows) == 2
    for row in rows:
        assert row["completed"] == 8 and row["failed"] == 0 and row["model"] == "tiny"
        assert row["output_tokens"] == 8 * 6                      # ignore_eos: every request ran to its length
        assert 0 < row["ttft_ms"]["p50"] <= row["e2e_ms"]["p50"] and row["tpot_ms"]["p50"] > 0
        assert row["itl_ms"]["p99"] >= row["itl_ms"]["p50"] > 0
    assert len(list(tmp_path.glob("serving-*.png"))) == 2         # percentiles, throughput vs concurrency
    assert tiny_server.engine.stats().num_free_blocks == before.num_free_blocks


def test_serving_reports_refused_requests(tiny_server_model, tmp_path, capsys):
    from conftest import RunningServer

    server = RunningServer(tiny_server_model, api_keys=["right"])
    try:
        code, out, err = run_cli(["bench", "serving", "--base-url", server.url, "--model", "tiny", "--api-key", "wrong",
                                  "--tokenizer", str(tiny_server_model), "--num-prompts", "3", "--input-len", "8",
                                  "--output-len", "4", "--output-dir", str(tmp_path), "--no-progress"], capsys)
    finally:
        server.close()
    assert code == 1 and "HTTP 401" in err
    (row,), _ = written(tmp_path, "serving")
    assert row["completed"] == 0 and row["failed"] == 3


def test_sharegpt_dataset(tiny_server_model, tmp_path):
    from quantserve.bench.workload import load
    from quantserve.text import Tokenizer

    rows = [{"conversations": [{"from": "human", "value": "Quartz zebras jump over lazy wolves."},
                               {"from": "gpt", "value": "Wolves nap while zebras run."}]},
            {"conversations": [{"from": "human", "value": "hi"}]},                     # no reply: skipped
            {"id": "no conversations"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    tok = Tokenizer(tiny_server_model).hf
    (req,) = load(tok, str(path), 10, 0, None, 0)
    assert req.prompt_ids == tok.encode(req.prompt, add_special_tokens=False)
    assert req.output_len == len(tok.encode("Wolves nap while zebras run.", add_special_tokens=False))
    assert load(tok, str(path), 10, 0, 3, 0)[0].output_len == 3


@pytest.mark.parametrize("args, message", [
    (["throughput", "--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["throughput", "--dataset", "/nonexistent.json"], "--dataset /nonexistent.json: not a readable ShareGPT"),
    (["latency", "--batch-size", "0"], "--batch-size, --input-len and --output-len must be at least 1"),
    (["serving", "--base-url", "http://127.0.0.1:9", "--request-rate", "0"], "--request-rate must be > 0"),
])
def test_bad_input_is_one_line(args, message, tiny_server_model, tmp_path, capsys):
    model = [] if args[0] == "serving" else [str(tiny_server_model)]
    extra = ["--tokenizer", str(tiny_server_model)] if args[0] == "serving" else ENGINE
    code, _, err = run_cli(["bench", args[0], *model, *args[1:], *extra, "--output-dir", str(tmp_path)], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


LLAMA_SERVER = Path.home() / ".cache" / "llamacpp-0.3.36" / "build" / "bin" / "llama-server"


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_SERVER.exists(), reason="llama.cpp's tools are not built here "
                                                      "(../shared/tools/llamacpp.sh builds them, about 8 minutes)")
def test_serving_against_llama_server(default_model, tmp_path, capsys):
    """llama.cpp's own C++ OpenAI server, with parallel slots, on the default model's shipped Q4_1 GGUF."""
    import subprocess

    from benchmarks.bench_llamacpp import free_port, wait_ready
    from quantserve import envs

    gguf = envs.quantserve_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(gguf), "-t", "2", "-np", "2", "-c", "2048", "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
        code, out, _ = run_cli(["bench", "serving", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "4",
                                "--input-len", "32", "--output-len", "8", "--concurrency", "2",
                                "--output-dir", str(tmp_path), "--no-progress"], capsys)
    finally:
        proc.terminate()
        proc.wait(30)
    assert code == 0
    (row,), _ = written(tmp_path, "serving")
    assert row["completed"] == 4 and row["output_tokens"] == 4 * 8 and row["ttft_ms"]["p50"] > 0


def test_a_failed_plot_keeps_the_results_and_is_one_line(tiny_server_model, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if matplotlib were missing: import fails
    code, _, err = run_cli(["bench", "latency", str(tiny_server_model), "--batch-size", "1", "--input-len", "8",
                            "--output-len", "2", "--output-dir", str(tmp_path), *ENGINE], capsys)
    assert code == 0
    rows, csv_rows = written(tmp_path, "latency")
    assert len(rows) == len(csv_rows) == 1 and not list(tmp_path.glob("*.png"))
    (line,) = [l for l in err.splitlines() if l.startswith("quantserve bench: plot")]
    assert "not written (ModuleNotFoundError: import of matplotlib" in line and "Traceback" not in err
    assert err.splitlines()[-1].startswith("results: ") and ".png" not in err.splitlines()[-1]


def test_a_request_on_a_connection_the_server_closed_unanswered_is_sent_again():
    """A server that drops its first connection without a response (as a kept-alive connection
    closed under the client looks): the request goes once more on a new connection and counts."""
    import asyncio

    import httpx

    from quantserve.bench.serving import ServingConfig, one_request
    from quantserve.bench.workload import BenchRequest

    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        connections.append(head)
        if len(connections) > 1:
            event = json.dumps({"choices": [{"text": "hi"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                         + f"data: {event}\n\ndata: [DONE]\n\n".encode())
            await writer.drain()
        writer.close()

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient() as client:
            cfg = ServingConfig(base_url=f"http://127.0.0.1:{port}")
            return await one_request(client, cfg, "m", BenchRequest("hello", [1, 2, 3], 1))

    out = asyncio.run(scenario())
    assert out.ok and out.output_tokens == 1 and out.error == "" and len(connections) == 2
