"""End to end on the real default model (SmolLM2-135M-Instruct): the tutorials' server command,
their openai client script, api_client, and batching through HTTP in float16."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def homework_server(default_model, tmp_path_factory):
    """`quantserve serve api_server` with the tutorial's flags, as a separate process."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server",
                                 "--quant-policy", "4", "--cache-max-entry-count", "0.4", "--server-name", "0.0.0.0",
                                 "--server-port", str(port), "--tp", "1"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    yield url, log
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_server_prints_its_memory_table_and_url(homework_server):
    _, log = homework_server
    text = log.read_text()
    for line in ("weights", "KV cache", "int4", "total", "/v1", "/docs"):
        assert line in text, text


@pytest.mark.slow
def test_tutorial_client_script_prints_a_reply(homework_server):
    url, _ = homework_server
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client.py"), "--base-url", url + "/v1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    reply = out.stdout.strip().lower()
    assert len(reply.split()) >= 10 and ("fox" in reply or "watermelon" in reply), reply


@pytest.mark.slow
def test_api_client_answers_piped_questions(homework_server):
    url, _ = homework_server
    out = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "serve", "api_client", url, "--temperature", "0",
                          "--max-tokens", "40"], input="What is the capital of France?\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_api_client_reports_an_unreachable_server_in_one_line():
    out = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "serve", "api_client",
                          f"http://127.0.0.1:{free_port()}"], input="", capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "error" in out.stderr


@pytest.mark.slow
def test_sixteen_concurrent_streams_equal_solo_answers_in_float16(homework_server):
    url, _ = homework_server
    questions = [f"In one sentence, what is {x}?" for x in
                 ("water", "fire", "a cat", "Paris", "a prime number", "the sun", "music", "a tree", "rain",
                  "a computer", "bread", "the moon", "a river", "chess", "a bicycle", "snow")]

    def body(q, stream=False):
        return {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": q}], "max_tokens": 24,
                "temperature": 0, "stream": stream}

    solo = [httpx.post(url + "/v1/chat/completions", json=body(q), timeout=120).json()["choices"][0]["message"]
            ["content"] for q in questions]

    async def streamed(client, q):
        import json

        text = ""
        async with client.stream("POST", url + "/v1/chat/completions", json=body(q, True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
        return text

    async def together():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(streamed(client, q) for q in questions))

    assert asyncio.run(together()) == solo


def test_bad_flags_are_one_line_errors(default_model):
    for args, flag in ((["--max-concurrent-requests", "0"], "--max-concurrent-requests"),
                       (["--ssl"], "--ssl"), (["--quant-policy", "3"], "--quant-policy"),
                       (["/no/such/model"], "does not exist"), (["--models-dir", "/nowhere"], "--models-dir"),
                       ([str(default_model), str(default_model), "--model-name", "a"], "--model-name")):
        out = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and flag in out.stderr and "Traceback" not in out.stderr, out.stderr
    others = [(["proxy", "--nodes", "foo"], "--nodes"), (["proxy", "--health-interval", "0"], "--health-interval"),
              (["ray", "--autoscale", "3", "1"], "--autoscale"), (["ray", "--num-replicas", "0"], "--num-replicas")]
    for command, flag in others:
        out = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "serve", *command],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and flag in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_gradio_command_serves_the_page_for_a_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quantserve.cli.main", "serve", "gradio",
                             f"http://127.0.0.1:{free_port()}", "--server-name", "127.0.0.1", "--server-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 60, None
        while time.monotonic() < deadline and page is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/")
            except httpx.TransportError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_readme_homework_script_quantizes_serves_and_answers(tmp_path):
    """examples/serve_and_ask.sh: lite auto_awq (W4A16), api_server --model-format awq with an int4
    KV cache, the tutorial's openai client script."""
    import os

    env = {**os.environ, "PORT": str(free_port()), "QUANTSERVE_HOME": str(tmp_path / "home")}
    default = Path(subprocess.run([sys.executable, "-m", "quantserve.cli.main", "default-model"], capture_output=True,
                                  text=True, check=True).stdout.strip())
    (tmp_path / "home" / "models").mkdir(parents=True)
    os.symlink(default, tmp_path / "home" / "models" / default.name)          # no second conversion ...
    os.symlink(default.parents[1] / "kernels", tmp_path / "home" / "kernels")  # ... nor kernel build
    done = subprocess.run(["bash", str(ROOT / "examples" / "serve_and_ask.sh")], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quantized SmolLM2-135M-Instruct with AWQ W4 g64" in done.stdout
    assert "int4" in done.stderr and "weights" in done.stderr                  # the server's memory table
    reply = done.stdout.split("weights:", 1)[1].split("\n", 1)[1]     # what the client printed after the summary
    assert len(reply.split()) >= 5, done.stdout[-2000:]
