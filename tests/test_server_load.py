"""The server under stress: clients that vanish, bursts past the limits, concurrent batching,
and a failing engine step."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

CHAT = "/v1/chat/completions"


def body(content: str = "The capital of France is", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **fields}


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    found = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "quantserve:kv_cache_blocks_free",
                 "quantserve:kv_cache_blocks_total", "quantserve:requests_aborted_total"):
        m = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, flags=re.M)
        found[name] = float(m.group(1))
    return found


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        idle = (g["vllm:num_requests_running"] == 0 and g["vllm:num_requests_waiting"] == 0
                and g["quantserve:kv_cache_blocks_free"] == g["quantserve:kv_cache_blocks_total"])
        if idle or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


def test_disconnect_flood_frees_everything(tiny_server):
    async def drop_mid_stream(client: httpx.AsyncClient, i: int) -> int:
        req = body(f"story number {i}", max_tokens=400, temperature=1.0, seed=i, stream=True,
                   ignore_eos=True)
        async with client.stream("POST", tiny_server.url + CHAT, json=req) as r:
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    return chunks        # leaving the block closes the connection mid-stream
        return chunks

    async def flood():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(drop_mid_stream(client, i) for i in range(100)))

    aborted_before = gauges(tiny_server.url)["quantserve:requests_aborted_total"]
    counts = asyncio.run(flood())
    assert all(n == 3 for n in counts), [c for c in counts if c != 3]
    g = wait_idle(tiny_server.url)
    assert g["vllm:num_requests_running"] == 0 and g["vllm:num_requests_waiting"] == 0
    assert g["quantserve:kv_cache_blocks_free"] == g["quantserve:kv_cache_blocks_total"]
    assert g["quantserve:requests_aborted_total"] - aborted_before >= 90
    start = time.monotonic()
    assert httpx.post(tiny_server.url + CHAT, json=body(), timeout=5).status_code == 200
    assert time.monotonic() - start < 5


def test_non_streaming_disconnect_aborts_too(tiny_server):
    aborted_before = gauges(tiny_server.url)["quantserve:requests_aborted_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + CHAT, json=body(max_tokens=2000, temperature=1.0, seed=1, ignore_eos=True),
                   timeout=0.2)
    g = wait_idle(tiny_server.url)
    assert g["vllm:num_requests_running"] == 0
    assert g["quantserve:requests_aborted_total"] == aborted_before + 1


def test_batched_requests_equal_solo_requests(tiny_server):
    prompts = [f"{'Héllo wörld ' * (i % 5)}question {i}: def f(x): return x * {i}" for i in range(16)]
    solo = [httpx.post(tiny_server.url + CHAT, json=body(p, max_tokens=24), timeout=60).json()
            ["choices"][0]["message"]["content"] for p in prompts]

    async def streamed(client, p):
        text = ""
        async with client.stream("POST", tiny_server.url + CHAT, json=body(p, max_tokens=24, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
        return text

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(streamed(client, p) for p in prompts))

    assert asyncio.run(together()) == solo
    assert len(set(solo)) > 1


def test_overload_gets_429_with_retry_after_and_accepted_requests_finish(tiny_server_model):
    from conftest import RunningServer
    from quantserve.config import Limits

    server = RunningServer(tiny_server_model, limits=Limits(max_concurrent_requests=2, max_queued_requests=2))

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(server.url + CHAT, json=body(max_tokens=40))
                                          for _ in range(12)))

    try:
        responses = asyncio.run(asyncio.wait_for(burst(), 60))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 4
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.post(server.url + CHAT, json=body(), timeout=10).status_code == 200
    finally:
        server.close()


def test_rate_limit_per_key(tiny_server_model):
    from conftest import RunningServer
    from quantserve.config import Limits

    def codes(server, keys):
        return [httpx.post(server.url + CHAT, json=body(max_tokens=1), headers={"Authorization": f"Bearer {k}"})
                .status_code for k in keys]

    keyed = RunningServer(tiny_server_model, limits=Limits(rate_limit=3), api_keys=["a", "b"])
    try:
        assert codes(keyed, "aaaab") == [200, 200, 200, 429, 200]
    finally:
        keyed.close()
    open_server = RunningServer(tiny_server_model, limits=Limits(rate_limit=3))
    try:        # without keys the budget is per client address: made-up keys do not buy more
        assert codes(open_server, "wxyz") == [200, 200, 200, 429]
    finally:
        open_server.close()


def test_a_failing_step_fails_only_its_requests(tiny_server, monkeypatch):
    from conftest import fail_engine_step

    fail_engine_step(monkeypatch, tiny_server, step=1)
    r = httpx.post(tiny_server.url + CHAT, json=body(), timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error" and "injected fault" in r.json()["error"]["message"]
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    assert httpx.post(tiny_server.url + CHAT, json=body(), timeout=30).status_code == 200
    assert wait_idle(tiny_server.url)["quantserve:kv_cache_blocks_free"] == \
        gauges(tiny_server.url)["quantserve:kv_cache_blocks_total"]
