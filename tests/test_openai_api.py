"""The HTTP contract, driven by the official `openai` client against a real server (tiny model)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

MSG = [{"role": "user", "content": "The capital of France is"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


def test_models_list_names_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_chat_completion_greedy_is_reproducible_and_counts_tokens(client, tiny_server):
    a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason in ("stop", "length")
    prompt_ids = httpx.post(tiny_server.url + "/v1/tokenize", json={"messages": MSG}).json()["tokens"]
    assert a.usage.prompt_tokens == len(prompt_ids)
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens

    long = [{"role": "user", "content": "The capital of France is Paris. " * 12}]
    first, again = (client.chat.completions.create(model="tiny", messages=long, max_tokens=2) for _ in range(2))
    assert first.usage.prompt_tokens > 64 and again.usage.prompt_tokens_details.cached_tokens >= 64   # one block


def test_streaming_matches_non_streaming_and_reports_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_with_seed_are_distinct_and_reproducible(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, n=2, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]
    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert [c.message.content for c in other.choices] != texts


def test_streamed_n_2_keeps_choices_apart(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=10, temperature=1.0, n=2, seed=3)
    full = client.chat.completions.create(**kw)
    parts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
    assert parts == {c.index: c.message.content for c in full.choices}


def test_logprobs_are_log_probabilities_of_the_sampled_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        best = item.top_logprobs[0]
        assert best.logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert item.logprob == pytest.approx(best.logprob)          # greedy takes the most likely token


def test_logprob_bytes_rebuild_the_text_even_across_split_characters(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "日本語 ✓"}], max_tokens=24,
                                       temperature=1.0, seed=4, logprobs=True, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    raw = b"".join(bytes(item.bytes) for item in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content


def test_logit_bias_forces_a_token(client, tiny_server):
    tok = tiny_server.state.service.model.tokenizer.hf
    target = tok.encode(" Paris", add_special_tokens=False)[0]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0,
                                       logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)


def test_stop_strings_of_any_length_end_the_text(client):
    free = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    stop = text[5:12]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(client, seed):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=120, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_mode_returns_an_object(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:                       # a random model may run out of tokens inside the object: still a prefix of one
        assert r.choices[0].message.content.startswith("{")


def test_tool_choice_named_is_enforced(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=1.0, seed=5,
                                       tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


@pytest.mark.parametrize("seed,parallel", [(0, False), (1, False), (2, True)])
def test_tool_choice_required_gives_valid_calls(client, seed, parallel):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=600, temperature=1.0, seed=seed,
                                       tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    assert len(calls) == 1 or parallel
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_tool_calls_arrive_as_deltas(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=80, temperature=1.0, seed=5, tools=[WEATHER],
              tool_choice="required", parallel_tool_calls=False)
    full = client.chat.completions.create(**kw)
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                calls.setdefault(d.index, {"name": "", "arguments": ""})
                calls[d.index]["name"] += d.function.name or ""
                calls[d.index]["arguments"] += d.function.arguments or ""
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in full.choices[0].message.tool_calls]
    assert list(calls.values()) == expected and reasons[-1] == "tool_calls"


def test_tool_results_go_back_into_the_conversation(client):
    messages = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_completions_prompt_list_echo_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt=["def f(x):", "Héllo"], max_tokens=5, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    echoed = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "def f(x):" + r.choices[0].text
    lp = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == lp.usage.completion_tokens
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text


def test_completions_stream_and_token_prompt(client, tiny_server):
    ids = tiny_server.state.service.model.tokenizer.hf.encode("def f(x):")
    full = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == full.choices[0].text


def test_penalties_change_the_output(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=40, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    penalised = client.chat.completions.create(**kw, frequency_penalty=2.0).choices[0].message.content
    assert plain != penalised


def test_tokenize_detokenize_round_trip(tiny_server):
    ids = httpx.post(tiny_server.url + "/v1/tokenize", json={"prompt": "Héllo wörld"}).json()
    text = httpx.post(tiny_server.url + "/v1/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text.endswith("Héllo wörld") and ids["count"] == len(ids["tokens"])


def test_health_metrics_and_docs(tiny_server, client):
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    metrics = httpx.get(tiny_server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:request_queue_time_seconds_count",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert name in metrics, name
    assert httpx.get(tiny_server.url + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(tiny_server.url + "/openapi.json").json()["paths"]


def test_websocket_streams_chunks(tiny_server, client):
    from websockets.sync.client import connect

    body = {"model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0}
    full = client.chat.completions.create(**body).choices[0].message.content
    with connect(tiny_server.url.replace("http", "ws") + "/v1/chat/completions/ws") as ws:
        ws.send(json.dumps(body))
        messages = []
        while (m := ws.recv()) != "[DONE]":
            messages.append(json.loads(m))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in messages if c["choices"]) == full


def test_api_keys_cors_and_open_health(tiny_server_model):
    from conftest import RunningServer

    server = RunningServer(tiny_server_model, api_keys=["k1", "k2"], allow_origins=["http://ui.example"])
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        assert server.client(api_key="k2").models.list().data[0].id == "tiny"
        assert httpx.get(server.url + "/health").status_code == 200
        pre = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://ui.example"
        bad = httpx.options(server.url + "/v1/models", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in bad.headers
    finally:
        server.close()


def test_tls(tiny_server_model, tmp_path):
    import ssl
    import subprocess

    from conftest import RunningServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = RunningServer(tiny_server_model, uvicorn_options={"ssl_certfile": str(cert), "ssl_keyfile": str(key)})
    try:
        assert server.url.startswith("https://")
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")                     # an unknown certificate is refused
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as http:
            client = server.client(http_client=http)
            assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices[0].message
    finally:
        server.close()


def test_chat_templates_render_in_a_sandbox(tiny_server):
    from quantserve.serve.plan import encode_chat
    from quantserve.serve.protocol import ChatMessage
    from quantserve.serve.errors import APIError

    model = tiny_server.state.service.model
    saved = model.tokenizer.chat_template
    model.tokenizer.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    try:
        with pytest.raises(APIError) as e:
            encode_chat([ChatMessage(role="user", content="hi")], model, [])
        assert e.value.status == 400 and "template" in e.value.message
    finally:
        model.tokenizer.chat_template = saved


def test_health_is_503_while_loading_after_a_failed_load_and_when_the_engine_stopped(tiny_server_model):
    from fastapi.testclient import TestClient

    from conftest import RunningServer
    from quantserve.config import ServerConfig
    from quantserve.serve.openai_app import ServerState, build_app
    from quantserve.serve.registry import ModelRegistry

    gate = threading.Event()

    def slow_failing_load(name, path, overrides):
        gate.wait(10)
        raise FileNotFoundError(f"no config.json in {path}")

    state = ServerState(ServerConfig("tiny"), ModelRegistry(slow_failing_load))
    loading = state.models.start([("tiny", "/nowhere")])
    client = TestClient(build_app(state))
    for path, method in (("/health", "get"), ("/v1/models", "get")):
        r = getattr(client, method)(path)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG}).status_code == 503
    gate.set()
    loading.join(10)
    assert "no config.json in /nowhere" in client.get("/health").json()["error"]["message"]

    server = RunningServer(tiny_server_model)
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        server.engine.shutdown()
        r = httpx.get(server.url + "/health")     # an engine stopped under the server is restarted (self-healing)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_restarting"
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine was not restarted"
            time.sleep(0.05)
    finally:
        server.close()


def test_usage_counts_a_prompts_cache_hits_once(client):
    long = [{"role": "user", "content": "Héllo wörld, this prompt is long enough. " * 6}]
    client.chat.completions.create(model="tiny", messages=long, max_tokens=1)
    full = client.chat.completions.create(model="tiny", messages=long, max_tokens=8, temperature=0)
    streamed = list(client.chat.completions.create(model="tiny", messages=long, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    cached = full.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= full.usage.prompt_tokens and cached % 64 == 0
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_forced_tool_calls_are_not_also_content(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=80, temperature=1.0, seed=5, tools=[WEATHER],
              tool_choice="required", parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.tool_calls and r.choices[0].message.content is None
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert all(not d.content for d in deltas)


def test_eos_text_never_shows_even_with_special_tokens_kept(client, tiny_server):
    eos = tiny_server.state.service.model.tokenizer.eos_token_ids[0]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, logit_bias={str(eos): 100},
                                       extra_body={"skip_special_tokens": False})
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"


def test_streamed_completion_text_offsets_keep_counting(client):
    text, firsts = "", []
    for chunk in client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                           temperature=0, logprobs=1, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.text_offset:
                firsts.append((c.logprobs.text_offset[0], len(text)))     # each chunk starts where the text is
            text += c.text
    assert firsts and all(offset == sent for offset, sent in firsts) and firsts[-1][0] > 0


def test_websocket_refuses_binary_garbage_and_counts_against_the_rate_limit(tiny_server_model):
    from websockets.sync.client import connect

    from conftest import RunningServer
    from quantserve.config import Limits

    server = RunningServer(tiny_server_model, limits=Limits(rate_limit=2))
    ws_url = server.url.replace("http", "ws") + "/v1/chat/completions/ws"
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2})
    try:
        with connect(ws_url) as ws:
            ws.send(b"\xff\x00garbage")
            assert json.loads(ws.recv())["error"]["type"] == "invalid_request_error"
        replies = []
        for _ in range(3):
            with connect(ws_url) as ws:
                ws.send(body)
                replies.append(json.loads(ws.recv()))
        assert "error" not in replies[1] and replies[2]["error"]["code"] == "rate_limit_exceeded"
    finally:
        server.close()
