"""WebSocket sessions (WS /v1/sessions/ws) against a real server, with the `websockets` client."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import RunningServer
from quantserve.config import EngineConfig, Limits

SYSTEM = "You are a helpful assistant."


@contextmanager
def session(server, **headers):
    with connect(server.url.replace("http", "ws") + "/v1/sessions/ws", additional_headers=headers or None) as ws:
        yield Session(ws)


class Session:
    """One session's connection, with the few steps the tests take."""

    def __init__(self, ws):
        self.ws = ws

    def send(self, **message) -> None:
        self.ws.send(json.dumps(message))

    def recv(self) -> dict:
        return json.loads(self.ws.recv(timeout=120))

    def turn(self, content: str, **fields) -> tuple[str, dict]:
        """The reply's text and the turn's last event (done, or an error)."""
        self.send(type="request", content=content, **fields)
        text = ""
        while (event := self.recv())["type"] == "delta":
            text += event["text"]
        return text, event

    def first_delta(self, content: str, **fields) -> dict:
        self.send(type="request", content=content, **fields)
        event = self.recv()
        assert event["type"] == "delta", event
        return event


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def stateless(server, model: str, history: list[dict], **fields) -> dict:
    return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": history, **fields}).json()


def check_turns_equal_stateless(server, model: str, questions: list[str], max_tokens: int) -> list[dict]:
    """Each turn's reply is the stateless call's on the same history (greedy); the done events."""
    with session(server) as s:
        s.send(type="session.start", model=model, system=SYSTEM, temperature=0, max_tokens=max_tokens)
        assert s.recv()["type"] == "session.started"
        history, dones = [{"role": "system", "content": SYSTEM}], []
        for n, question in enumerate(questions, 1):
            text, done = s.turn(question)
            history.append({"role": "user", "content": question})
            full = stateless(server, model, history, temperature=0, max_tokens=max_tokens)
            assert done["type"] == "done" and done["turn"] == n, done
            assert text == full["choices"][0]["message"]["content"]
            assert done["finish_reason"] == full["choices"][0]["finish_reason"]
            assert done["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
            assert done["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
            history.append({"role": "assistant", "content": text})
            dones.append(done)
        return dones


def test_turns_equal_stateless_calls_on_the_tiny_model(tiny_server):
    dones = check_turns_equal_stateless(tiny_server, "tiny", ["The capital of France is", "def f(x):", "Héllo"], 12)
    assert all(d["ttft_s"] > 0 for d in dones)
    # the tiny model's random replies re-tokenize differently, but each prompt's own blocks are reused
    for before, after in zip(dones, dones[1:]):
        assert after["usage"]["cached_tokens"] >= before["usage"]["prompt_tokens"] // 64 * 64


@pytest.fixture(scope="module")
def smol_server(default_model):
    server = RunningServer(default_model, EngineConfig(enable_prefix_caching=True, cache_max_tokens=4096,
                                                       session_len=2048, max_batch_size=4, cache_block_seq_len=16),
                           model_name="smol")
    yield server
    server.close()


def test_each_turn_prefills_only_its_new_tokens_on_the_real_model(smol_server):
    """A real model's replies tokenize back to the same ids, so turn n+1 finds turn n's prompt and
    reply in the cache, all but the last partial block (16 tokens)."""
    questions = ["Name three colours.", "Which of them is the colour of the sky?", "How do you say it in French?",
                 "Write a haiku about it."]
    dones = check_turns_equal_stateless(smol_server, "smol", questions, 40)
    for before, after in zip(dones, dones[1:]):
        used = before["usage"]["prompt_tokens"] + before["usage"]["completion_tokens"]
        assert after["usage"]["cached_tokens"] >= used - 16, (before, after)


def test_blocks_stay_pinned_between_turns_and_return_when_the_client_goes(tiny_server):
    engine = tiny_server.engine
    stats = engine.stats
    assert wait_for(lambda: stats().num_free_blocks == stats().num_blocks)
    with session(tiny_server) as s:
        _, done = s.turn("The capital of France is Paris. " * 12, model="tiny", max_tokens=4)
        assert done["type"] == "done" and stats().num_pinned_blocks > 0       # kept between turns
        metrics = httpx.get(tiny_server.url + "/metrics").text
        assert f'quantserve:kv_cache_blocks_pinned{{model_name="tiny"}} {stats().num_pinned_blocks}.0' in metrics
        s.first_delta("Tell me more.", max_tokens=400, ignore_eos=True, temperature=1.0)
        assert stats().num_running == 1
    # the client left mid-turn: its request is aborted, its pin released
    assert wait_for(lambda: stats().num_running == 0 and stats().num_pinned_blocks == 0
                    and stats().num_free_blocks == stats().num_blocks)


def test_cancel_keeps_the_partial_reply_and_the_session_goes_on(tiny_server):
    with session(tiny_server) as s:
        s.send(type="session.start", model="tiny", temperature=0)
        assert s.recv()["type"] == "session.started"
        partial = s.first_delta("The capital of France is", max_tokens=1500, ignore_eos=True)["text"]
        s.send(type="cancel")
        while (event := s.recv())["type"] == "delta":
            partial += event["text"]
        assert event["type"] == "done" and event["finish_reason"] == "cancelled" and event["turn"] == 1
        assert 0 < event["usage"]["completion_tokens"] < 1500
        s.send(type="cancel")                             # nothing in flight: nothing happens
        _, done = s.turn("And of Germany?", max_tokens=6)
        assert done["type"] == "done" and done["turn"] == 2 and done["finish_reason"] in ("stop", "length")
        history = [{"role": "user", "content": "The capital of France is"},
                   {"role": "assistant", "content": partial}, {"role": "user", "content": "And of Germany?"}]
        tokens = httpx.post(tiny_server.url + "/v1/tokenize", json={"messages": history}).json()["count"]
        assert done["usage"]["prompt_tokens"] == tokens                   # the partial reply is history
        s.send(type="request", content="Hi", max_tokens=1500, ignore_eos=True)
        s.send(type="cancel")                             # right behind: maybe before the turn's first step
        while (event := s.recv())["type"] == "delta":
            pass
        assert event["finish_reason"] == "cancelled" and event["turn"] == 3
    assert wait_for(lambda: tiny_server.state.service.active == 0)        # every admission ticket is back


def test_bad_messages_get_error_events_and_the_session_goes_on(tiny_server):
    with session(tiny_server) as s:
        s.send(type="session.start", model="no-such-model")
        assert s.recv()["error"]["code"] == "model_not_found"
        s.send(type="request", content="hi")
        assert s.recv()["error"]["param"] == "model"              # still no model
        s.send(type="session.start", model="tiny", temperature=7)
        assert s.recv()["error"]["param"] == "temperature"
        s.send(type="session.start", model="tiny", max_tokens=4)
        assert s.recv()["type"] == "session.started"
        bad = [({"type": "bogus"}, "type"), ({"type": "request", "content": "hi", "max_tokens": 0}, "max_tokens"),
               ({"type": "request", "content": "hi", "max_tokens": "ten"}, "max_tokens"),
               ({"type": "request"}, "content"), ({"type": "request", "content": "hi", "n": 2}, "n"),
               ({"type": "request", "content": "hi", "model": "other"}, "model"),
               ({"type": "request", "content": "hi", "system": "Be rude."}, "system"),
               ({"type": "request", "messages": [{"role": "nobody", "content": "x"}]}, "messages.0.role"),
               ({"type": "request", "content": "x " * 3000}, "messages"),
               ({"type": "session.start", "model": "tiny"}, "type")]
        for message, param in bad:
            s.send(**message)
            event = s.recv()
            assert event["type"] == "error" and event["error"]["param"] == param, (message, event)
            assert event["error"]["type"] == "invalid_request_error"
        for raw in ("not json", "[1, 2]", b"\xff\x00"):
            s.ws.send(raw)
            assert s.recv()["error"]["type"] == "invalid_request_error"
        s.first_delta("The capital of France is", max_tokens=1500, ignore_eos=True)
        s.send(type="request", content="again")                  # one turn at a time
        while (event := s.recv())["type"] == "delta":
            pass
        assert event["error"]["code"] == "turn_in_flight"
        s.send(type="cancel")
        while (event := s.recv())["type"] == "delta":
            pass
        assert event["finish_reason"] == "cancelled"
        _, done = s.turn("Hello")
        assert done["type"] == "done" and done["turn"] == 2


def test_reset_clears_the_history_and_close_ends_the_session(tiny_server):
    stats = tiny_server.engine.stats
    with session(tiny_server) as s:
        s.send(type="session.start", model="tiny", system=SYSTEM, max_tokens=4, temperature=0)
        s.recv()
        _, first = s.turn("The capital of France is")
        _, second = s.turn("And of Germany?")
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
        s.send(type="reset")
        assert s.recv()["type"] == "session.reset"
        assert wait_for(lambda: stats().num_pinned_blocks == 0)
        _, again = s.turn("The capital of France is")
        assert again["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] and again["turn"] == 3
        s.send(type="close")
        assert s.recv()["type"] == "session.closed"
    assert wait_for(lambda: stats().num_pinned_blocks == 0)


def test_api_keys_rate_limits_and_metrics_cover_sessions(tiny_server_model):
    server = RunningServer(tiny_server_model, api_keys=["k1"], limits=Limits(rate_limit=2))
    try:
        with pytest.raises(InvalidStatus):
            with session(server):
                pass
        with pytest.raises(InvalidStatus):
            with session(server, Authorization="Bearer wrong"):
                pass
        with session(server, Authorization="Bearer k1") as s:
            s.send(type="session.start", model="tiny", max_tokens=3, ignore_eos=True)
            s.recv()
            assert s.turn("one")[1]["type"] == "done" and s.turn("two")[1]["type"] == "done"
            _, event = s.turn("three")                             # two requests a minute
            assert event["type"] == "error" and event["error"]["code"] == "rate_limit_exceeded"
            s.send(type="reset")
            assert s.recv()["type"] == "session.reset"             # refused turns leave it open
        metrics = httpx.get(server.url + "/metrics").text
        assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 2.0' in metrics
        assert 'quantserve:requests_rejected_total{model_name="tiny",reason="rate_limit"} 1.0' in metrics
    finally:
        server.close()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                          "required": ["city"], "additionalProperties": False}}}


def test_tool_calls_and_results_go_through_the_history(tiny_server):
    """Tools set at the start; a forced call arrives as a delta and stays in the history with its id;
    the tool's result is sent as messages; the next turn is the stateless call's."""
    with session(tiny_server) as s:
        s.send(type="session.start", model="tiny", tools=[WEATHER], temperature=0, max_tokens=8)
        s.recv()
        s.send(type="request", content="Weather in Paris?", tool_choice="required", max_tokens=80,
               temperature=1.0, seed=5, parallel_tool_calls=False)
        calls = []
        while (event := s.recv())["type"] == "delta":
            calls += event.get("tool_calls", [])
        assert event["finish_reason"] == "tool_calls" and calls[0]["function"]["name"] == "get_weather"
        result = {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}
        s.send(type="request", messages=[result], logprobs=True)
        text, logprobs = "", []
        while (event := s.recv())["type"] == "delta":
            text, logprobs = text + event["text"], logprobs + event.get("logprobs", [])
        history = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": None, "tool_calls": calls}, result]
        full = stateless(tiny_server, "tiny", history, tools=[WEATHER], temperature=0, max_tokens=8, logprobs=True)
        assert text == full["choices"][0]["message"]["content"]
        assert event["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
        assert len(logprobs) == event["usage"]["completion_tokens"] > 0
        assert [e["token"] for e in logprobs] == [e["token"] for e in full["choices"][0]["logprobs"]["content"]]
