"""Negative suite: every bad request gets the right status and OpenAI's nested error shape, and
the server answers a normal request afterwards."""
from __future__ import annotations

import httpx
import pytest

OK_MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": OK_MSG, "max_tokens": 2, **fields}


def comp(**fields) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields}


def tool(name="f", parameters=None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


CHAT, COMP = "/v1/chat/completions", "/v1/completions"
BIG = 9 * 1024 * 1024

# (case id, path, JSON body or raw bytes, extra headers, expected status)
CASES = [
    ("no body", CHAT, None, {}, 400),
    ("malformed json", CHAT, b'{"model": "tiny", "messages": [', {}, 400),
    ("json array body", CHAT, b"[1, 2]", {}, 400),
    ("plain text content type", CHAT, b"hello", {"content-type": "text/plain"}, 400),
    ("missing model", CHAT, {"messages": OK_MSG}, {}, 400),
    ("missing messages", CHAT, {"model": "tiny"}, {}, 400),
    ("empty messages", CHAT, chat(messages=[]), {}, 400),
    ("messages not a list", CHAT, chat(messages="hi"), {}, 400),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), {}, 400),
    ("message without role", CHAT, chat(messages=[{"content": "hi"}]), {}, 400),
    ("user message without content", CHAT, chat(messages=[{"role": "user"}]), {}, 400),
    ("content of wrong type", CHAT, chat(messages=[{"role": "user", "content": 5}]), {}, 400),
    ("content part of unknown type", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), {}, 400),
    ("unknown model", CHAT, chat(model="gpt-9"), {}, 404),
    ("model not a string", CHAT, chat(model=3), {}, 400),
    ("temperature negative", CHAT, chat(temperature=-1), {}, 400),
    ("temperature huge", CHAT, chat(temperature=1e9), {}, 400),
    ("temperature NaN", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     {}, 400),
    ("temperature Infinity", CHAT,
     b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', {}, 400),
    ("temperature string", CHAT, chat(temperature="hot"), {}, 400),
    ("top_p zero", CHAT, chat(top_p=0), {}, 400),
    ("top_p above one", CHAT, chat(top_p=1.5), {}, 400),
    ("top_k below -1", CHAT, chat(top_k=-5), {}, 400),
    ("min_p above one", CHAT, chat(min_p=2), {}, 400),
    ("n zero", CHAT, chat(n=0), {}, 400),
    ("n negative", CHAT, chat(n=-1), {}, 400),
    ("n over the cap", CHAT, chat(n=1000), {}, 400),
    ("n float", CHAT, chat(n=1.5), {}, 400),
    ("max_tokens zero", CHAT, chat(max_tokens=0), {}, 400),
    ("max_tokens negative", CHAT, chat(max_tokens=-3), {}, 400),
    ("max_tokens past the context", CHAT, chat(max_tokens=10**9), {}, 400),
    ("max_completion_tokens zero", CHAT, chat(max_completion_tokens=0), {}, 400),
    ("presence_penalty out of range", CHAT, chat(presence_penalty=3), {}, 400),
    ("frequency_penalty out of range", CHAT, chat(frequency_penalty=-2.5), {}, 400),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), {}, 400),
    ("seed float", CHAT, chat(seed=1.5), {}, 400),
    ("seed too large", CHAT, chat(seed=2**70), {}, 400),
    ("stream not a bool", CHAT, chat(stream="yes please"), {}, 400),
    ("stop empty string", CHAT, chat(stop=""), {}, 400),
    ("stop list with a number", CHAT, chat(stop=["a", 3]), {}, 400),
    ("too many stops", CHAT, chat(stop=[f"s{i}" for i in range(40)]), {}, 400),
    ("stop string too long", CHAT, chat(stop=["x" * 1000]), {}, 400),
    ("logit_bias out of vocab", CHAT, chat(logit_bias={"999999": 5}), {}, 400),
    ("logit_bias negative id", CHAT, chat(logit_bias={"-4": 5}), {}, 400),
    ("logit_bias non-numeric key", CHAT, chat(logit_bias={"abc": 5}), {}, 400),
    ("logit_bias double minus key", CHAT, chat(logit_bias={"--1": 5}), {}, 400),
    ("logit_bias superscript digit key", CHAT, chat(logit_bias={"²": 5}), {}, 400),
    ("logit_bias huge key", CHAT, chat(logit_bias={"9" * 5000: 5}), {}, 400),
    ("logit_bias value too big", CHAT, chat(logit_bias={"5": 500}), {}, 400),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), {}, 400),
    ("continue_final_message with a user message last", CHAT, chat(continue_final_message=True), {}, 400),
    ("top_logprobs too many", CHAT, chat(logprobs=True, top_logprobs=50), {}, 400),
    ("response_format unknown type", CHAT, chat(response_format={"type": "xml"}), {}, 400),
    ("json_schema without schema object", CHAT, chat(response_format={"type": "json_schema"}), {}, 400),
    ("json_schema invalid", CHAT,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), {}, 400),
    ("tools not a list", CHAT, chat(tools={"type": "function"}), {}, 400),
    ("tool without function", CHAT, chat(tools=[{"type": "function"}]), {}, 400),
    ("tool of unknown type", CHAT, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), {}, 400),
    ("tool name with spaces", CHAT, chat(tools=[tool("get weather")]), {}, 400),
    ("tool parameters invalid schema", CHAT,
     chat(tools=[tool(parameters={"type": "nonsense"})], tool_choice="required"), {}, 400),
    ("tool_choice unknown string", CHAT, chat(tools=[tool()], tool_choice="sometimes"), {}, 400),
    ("tool_choice names a missing tool", CHAT,
     chat(tools=[tool()], tool_choice={"type": "function", "function": {"name": "g"}}), {}, 400),
    ("tool_choice required without tools", CHAT, chat(tool_choice="required"), {}, 400),
    ("tool call arguments not JSON", CHAT, chat(messages=OK_MSG + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]), {}, 400),
    ("prompt over the context", CHAT, chat(messages=[{"role": "user", "content": "word " * 5000}]), {}, 400),
    ("oversized body", CHAT, b'{"model": "tiny", "pad": "' + b"x" * BIG + b'"}', {}, 413),
    ("completions: empty prompt", COMP, comp(prompt=""), {}, 400),
    ("completions: empty prompt list", COMP, comp(prompt=[]), {}, 400),
    ("completions: prompt of wrong type", COMP, comp(prompt={"text": "hi"}), {}, 400),
    ("completions: token id out of vocab", COMP, comp(prompt=[1, 2, 10**6]), {}, 400),
    ("completions: logprobs too many", COMP, comp(logprobs=99), {}, 400),
    ("completions: suffix without FIM tokens", COMP, comp(suffix="end"), {}, 400),
    ("completions: echo with logprobs", COMP, comp(echo=True, logprobs=1), {}, 400),
    ("completions: too many sequences", COMP, comp(prompt=["a"] * 10, n=8), {}, 400),
    ("completions: unknown model", COMP, comp(model="nope"), {}, 404),
    ("tokenize: neither prompt nor messages", "/v1/tokenize", {}, {}, 400),
    ("detokenize: id out of vocab", "/v1/detokenize", {"tokens": [10**6]}, {}, 400),
    ("unknown route", "/v1/embeddingz", {}, {}, 404),
]


def send(url: str, body, headers: dict) -> httpx.Response:
    if body is None:
        return httpx.post(url, headers=headers, timeout=30)
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json", **headers}, timeout=30)
    return httpx.post(url, json=body, headers=headers, timeout=30)


def assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_the_suite_has_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("name,path,body,headers,status", CASES, ids=[c[0] for c in CASES])
def test_bad_request(tiny_server, name, path, body, headers, status):
    error = assert_error_shape(send(tiny_server.url + path, body, headers), status)
    if status == 400 and "over the context" in name:
        assert error["code"] == "context_length_exceeded" and "2048" in error["message"]
    ok = httpx.post(tiny_server.url + CHAT, json=chat(), timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_wrong_method_is_an_error_object(tiny_server):
    r = httpx.get(tiny_server.url + CHAT)
    assert_error_shape(r, 405)


def test_chunked_oversized_body_is_413(tiny_server):
    def chunks():
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    r = httpx.post(tiny_server.url + CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413)


def test_error_mid_stream_is_an_event_then_done(tiny_server, monkeypatch):
    from conftest import fail_engine_step

    fail_engine_step(monkeypatch, tiny_server, step=3)
    with httpx.stream("POST", tiny_server.url + CHAT, json=chat(max_tokens=20, stream=True)) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "injected fault" in lines[-2]
