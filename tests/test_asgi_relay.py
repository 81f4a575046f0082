"""Requests carried as ASGI messages (how Ray Serve's ingress reaches a replica's OpenAI app)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from quantserve.serve.asgi_relay import first_messages, run_asgi

SCOPE = {"method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
         "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
        "temperature": 0, "ignore_eos": True}


def sse_text(raw: bytes) -> str:
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])


def test_a_streamed_answer_through_asgi_messages_equals_the_servers(tiny_server):
    from quantserve.serve.openai_app import build_app

    app = build_app(tiny_server.state)

    async def relay() -> list[dict]:
        return [m async for m in run_asgi(app, SCOPE, json.dumps({**CHAT, "stream": True}).encode())]

    messages = asyncio.run(relay())
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    direct = httpx.post(tiny_server.url + "/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    assert sse_text(b"".join(m.get("body", b"") for m in messages[1:])) == direct


def test_first_messages_stop_at_the_first_byte_and_leaving_early_aborts(tiny_server):
    from quantserve.serve.openai_app import build_app

    app = build_app(tiny_server.state)
    before = tiny_server.state.service.metrics.aborted._value.get()

    async def leave_after_first_token():
        answer = run_asgi(app, SCOPE, json.dumps({**CHAT, "stream": True, "max_tokens": 400}).encode())
        start, first = await first_messages(answer)
        await answer.aclose()                    # the client went away
        return start, first

    start, first = asyncio.run(leave_after_first_token())
    assert start["status"] == 200 and first[-1]["body"].startswith(b"data: ")
    assert tiny_server.state.service.metrics.aborted._value.get() == before + 1
    deadline = time.monotonic() + 5                 # the engine thread takes the abort at its next step
    while tiny_server.engine.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_server.engine.stats().num_running == 0

    async def bad_request():
        return [m async for m in run_asgi(app, SCOPE, b'{"model": "tiny", "messages": []}')]

    start, body = asyncio.run(bad_request())
    assert start["status"] == 400 and json.loads(body["body"])["error"]["param"] == "messages"


def test_the_relayed_response_cancels_the_work_only_when_the_client_leaves(tiny_server):
    from quantserve.serve.asgi_relay import streamed
    from quantserve.serve.openai_app import build_app

    app = build_app(tiny_server.state)

    async def relay(leave_early: bool) -> tuple[list[bool], bytes]:
        closed, received = [], b""
        answer = run_asgi(app, SCOPE, json.dumps({**CHAT, "stream": True, "max_tokens": 40}).encode())
        start, first = await first_messages(answer)
        response = streamed(start, first, answer, 1, on_close=lambda: closed.append(True))
        async for chunk in response.body_iterator:
            received += chunk
            if leave_early:
                break
        await response.body_iterator.aclose()
        await answer.aclose()
        return closed, received

    assert asyncio.run(relay(leave_early=True))[0] == [True]
    closed, received = asyncio.run(relay(leave_early=False))
    assert closed == [] and received.endswith(b"data: [DONE]\n\n")
