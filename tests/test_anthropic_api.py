"""Anthropic's Messages API, driven by the official `anthropic` client against a real server (tiny
model): answers equal the chat route's for the same conversation, streams fold to the same message,
tools come back as tool_use blocks, and every failure is in Anthropic's error shape."""
from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

MSG = [{"role": "user", "content": "The capital of France is"}]
GREEDY = {"temperature": 0}          # the client has no sampling arguments: they travel in extra_body
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                            "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                             "required": ["zone"], "additionalProperties": False}}


def claude_client(server, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def claude(tiny_server):
    return claude_client(tiny_server)


@pytest.fixture(scope="module")
def openai_client(tiny_server):
    return tiny_server.client()


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def blocks(message) -> list[dict]:
    """The content blocks, less what differs between two answers that are the same (tool_use ids)."""
    return [b.model_dump(include={"type", "text", "name", "input"}) for b in message.content]


def test_greedy_text_equals_the_chat_route(claude, openai_client):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *MSG]
    m = claude.messages.create(model="tiny", max_tokens=16, system="Be brief.", messages=conversation,
                               extra_body=GREEDY)
    r = openai_client.chat.completions.create(model="tiny", max_tokens=16, temperature=0,
                                              messages=[{"role": "system", "content": "Be brief."}, *conversation])
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert text_of(m) == r.choices[0].message.content and text_of(m)
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[r.choices[0].finish_reason]
    assert m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == r.usage.prompt_tokens
    assert m.usage.output_tokens == r.usage.completion_tokens


def test_cache_hits_are_cache_read_input_tokens(claude):
    long = [{"role": "user", "content": "Héllo wörld, this prompt is long enough. " * 6}]
    first = claude.messages.create(model="tiny", max_tokens=2, messages=long)
    again = claude.messages.create(model="tiny", max_tokens=2, messages=long)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert again.usage.cache_read_input_tokens >= 64 and again.usage.cache_read_input_tokens % 64 == 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


def test_streaming_equals_non_streaming(claude, tiny_server):
    kw = dict(model="tiny", max_tokens=20, messages=MSG, extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole)
    assert blocks(final) == blocks(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens == 20
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    kinds = [e.type for e in claude.messages.create(**kw, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    with httpx.stream("POST", tiny_server.url + "/v1/messages", json={**kw.pop("extra_body"), **kw, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[0] == "event: message_start" and lines[1].startswith("data: ") and lines[-2] == "event: message_stop"


def test_stop_sequences_end_the_text(claude):
    kw = dict(model="tiny", max_tokens=30, messages=MSG, extra_body=GREEDY)
    text = text_of(claude.messages.create(**kw))
    stop = text[5:12]
    m = claude.messages.create(**kw, stop_sequences=["never there", stop])
    assert text_of(m) == text[:text.find(stop)]
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    with claude.messages.stream(**kw, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(m) and (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_max_tokens_is_the_output_length(claude):
    m = claude.messages.create(model="tiny", max_tokens=7, messages=MSG, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 7


def test_system_prompt_as_string_and_as_blocks(claude, openai_client):
    kw = dict(model="tiny", max_tokens=12, messages=MSG, extra_body=GREEDY)
    as_text = claude.messages.create(**kw, system="You answer in French.")
    as_blocks = claude.messages.create(**kw, system=[{"type": "text", "text": "You answer "},
                                                     {"type": "text", "text": "in French."}])
    plain = claude.messages.create(**kw)
    assert blocks(as_text) == blocks(as_blocks)
    assert as_text.usage.input_tokens + as_text.usage.cache_read_input_tokens > \
        plain.usage.input_tokens + plain.usage.cache_read_input_tokens
    chat = openai_client.chat.completions.create(
        model="tiny", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "You answer in French."}, *MSG])
    assert text_of(as_text) == chat.choices[0].message.content


def test_named_tool_gives_a_valid_tool_use_and_its_result_continues(claude, openai_client):
    m = claude.messages.create(model="tiny", max_tokens=300, messages=MSG, tools=[WEATHER, TIME],
                               tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    (block,) = m.content
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == "get_weather"
    jsonschema.validate(block.input, WEATHER["input_schema"])

    turn = [*MSG, {"role": "assistant", "content": [b.model_dump(include={"type", "id", "name", "input"})
                                                    for b in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"},
                                         {"type": "text", "text": "And tomorrow?"}]}]
    after = claude.messages.create(model="tiny", max_tokens=8, messages=turn, tools=[WEATHER], extra_body=GREEDY)
    assert after.stop_reason in ("end_turn", "max_tokens", "tool_use")
    same = openai_client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, tools=[
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                          "parameters": WEATHER["input_schema"]}}], messages=[
        *MSG, {"role": "assistant", "content": None, "tool_calls": [{"id": block.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(block.input)}}]},
        {"role": "tool", "tool_call_id": block.id, "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"}])
    assert text_of(after) == (same.choices[0].message.content or "")
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens == same.usage.prompt_tokens
    without_result = claude.messages.count_tokens(model="tiny", messages=turn[:2] + [
        {"role": "user", "content": "And tomorrow?"}], tools=[WEATHER])
    assert without_result.input_tokens < same.usage.prompt_tokens          # the result is in the prompt


def test_tool_results_are_tool_messages_and_a_failed_one_says_so(claude, tiny_server):
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 1}}
    counts = []
    for is_error in (False, True):
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": is_error,
                  "content": [{"type": "text", "text": "sun"}, {"type": "text", "text": "ny"}]}
        counts.append(claude.messages.count_tokens(model="tiny", messages=[
            *MSG, {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, call]},
            {"role": "user", "content": [result]}]).input_tokens)
    for count, content in zip(counts, ("sunny", "Error: sunny")):
        ids = httpx.post(tiny_server.url + "/v1/tokenize", json={"messages": [
            *MSG, {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "toolu_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": json.dumps(call["input"])}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": content}]}).json()["tokens"]
        assert count == len(ids)
    assert counts[1] > counts[0]


def test_any_tool_and_streamed_tool_use_as_input_json_delta(claude):
    kw = dict(model="tiny", max_tokens=300, messages=MSG, tools=[WEATHER, TIME],
              tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    events = list(claude.messages.create(**kw, stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert [b.type for b in starts] == ["tool_use"] and starts[0].input == {}
    assert json.loads(partial) == whole.content[0].input
    assert [e.delta.stop_reason for e in events if e.type == "message_delta"] == ["tool_use"]
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    (block,) = final.content
    assert (block.name, block.input) == (whole.content[0].name, whole.content[0].input)
    schemas = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
    jsonschema.validate(block.input, schemas[block.name])


def test_tool_choice_none_leaves_the_tools_out(claude):
    kw = dict(model="tiny", messages=MSG)
    plain = claude.messages.count_tokens(**kw).input_tokens
    assert claude.messages.count_tokens(**kw, tools=[WEATHER]).input_tokens > plain
    assert claude.messages.count_tokens(**kw, tools=[WEATHER], tool_choice={"type": "none"}).input_tokens == plain


def test_count_tokens_is_the_prompt_length(claude, tiny_server):
    counted = claude.messages.count_tokens(model="tiny", messages=MSG, system="Be brief.")
    ids = httpx.post(tiny_server.url + "/v1/tokenize",
                     json={"messages": [{"role": "system", "content": "Be brief."}, *MSG]}).json()["tokens"]
    assert counted.input_tokens == len(ids)
    m = claude.messages.create(model="tiny", max_tokens=1, messages=MSG, system="Be brief.")
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == counted.input_tokens


def test_a_final_assistant_message_is_continued(claude, tiny_server):
    m = claude.messages.create(model="tiny", max_tokens=8, extra_body=GREEDY,
                               messages=[*MSG, {"role": "assistant", "content": "Paris, the city of"}])
    tok = tiny_server.state.service.model.tokenizer
    prompt = tok.hf.apply_chat_template(MSG, chat_template=tok.chat_template, add_generation_prompt=True,
                                        tokenize=False) + "Paris, the city of"
    ids = tok.hf.encode(prompt, add_special_tokens=False)
    continued = tiny_server.client().completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert text_of(m) == continued.choices[0].text
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
    chat = tiny_server.client().chat.completions.create(
        model="tiny", max_tokens=8, temperature=0, extra_body={"continue_final_message": True},
        messages=[*MSG, {"role": "assistant", "content": "Paris, the city of"}])
    assert chat.choices[0].message.content == text_of(m)


OK_BODY = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
BAD = [   # (case, changes to a good body, what the message names)
    ("missing max_tokens", {"max_tokens": None}, "max_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens a string", {"max_tokens": "5"}, "max_tokens"),
    ("max_tokens past the context", {"max_tokens": 10**6}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("missing messages", {"messages": None}, "messages"),
    ("system role in messages", {"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("unknown block type", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0.type"),
    ("empty block list", {"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ("text block without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0: a text block needs 'text'"),
    ("tool_use in a user message", {"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages.0"),
    ("tool_result in an assistant message", {"messages": [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}, "messages.0"),
    ("tool_use input not an object", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]}, "messages.1.content.0.input"),
    ("system a number", {"system": 5}, "system"),
    ("temperature above one", {"temperature": 1.5}, "temperature"),
    ("top_p zero", {"top_p": 0}, "top_p"),
    ("top_k negative", {"top_k": -1}, "top_k"),
    ("stream not a bool", {"stream": "yes"}, "stream"),
    ("empty stop sequence", {"stop_sequences": [""]}, "stop_sequences"),
    ("too many stop sequences", {"stop_sequences": [f"s{i}" for i in range(40)]}, "stop_sequences"),
    ("tool without input_schema", {"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ("tool schema not an object", {"tools": [{"name": "f", "input_schema": {"type": "string"}}]},
     "tools.0.input_schema"),
    ("tool name with spaces", {"tools": [{"name": "get weather", "input_schema": {"type": "object"}}]},
     "tools.0.name"),
    ("server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ("tool_choice any without tools", {"tool_choice": {"type": "any"}}, "tool_choice"),
    ("tool_choice names a missing tool", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name"),
    ("tool_choice of unknown type", {"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ("forced tool with an invalid schema", {"tools": [{"name": "f", "input_schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}], "tool_choice": {"type": "any"}}, "tools"),
    ("prompt over the context", {"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
    ("metadata user_id not a string", {"metadata": {"user_id": 5}}, "metadata.user_id"),
]


@pytest.mark.parametrize("name,changes,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_bad_request_naming_the_field(claude, name, changes, field):
    body = {k: v for k, v in {**OK_BODY, **changes}.items() if v is not None}
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.post("/v1/messages", cast_to=anthropic.types.Message, body=body)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert e.value.body["type"] == "error" and set(e.value.body["error"]) == {"type", "message"}
    assert e.value.body["error"]["message"].startswith(field), e.value.body
    assert claude.messages.create(**OK_BODY).type == "message"


def test_other_failures_keep_anthropics_shape(claude, tiny_server):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(**{**OK_BODY, "model": "claude-nope"})
    assert e.value.type == "not_found_error" and "claude-nope" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.count_tokens(model="tiny", messages=[])
    assert e.value.type == "invalid_request_error" and e.value.body["error"]["message"].startswith("messages")
    url = tiny_server.url + "/v1/messages"
    for r, status, kind in ((httpx.post(url, content=b'{"model": "tiny", "messages": [', timeout=30), 400,
                             "invalid_request_error"),
                            (httpx.post(url, content=b"x" * (9 * 1024 * 1024), timeout=30), 413, "request_too_large"),
                            (httpx.get(url), 405, "invalid_request_error")):
        assert r.status_code == status and r.json() == {"type": "error", "error": {"type": kind,
                                                                                   "message": r.json()["error"]["message"]}}
    openai_shape = httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert set(openai_shape.json()["error"]) == {"message", "type", "param", "code"}
    assert claude.messages.create(**OK_BODY).type == "message"


def test_a_stream_that_fails_midway_ends_with_an_error_event(claude, tiny_server, monkeypatch):
    from conftest import fail_engine_step

    fail_engine_step(monkeypatch, tiny_server, step=3)
    kinds = []
    with pytest.raises(anthropic.APIStatusError) as e:
        for event in claude.messages.create(**{**OK_BODY, "max_tokens": 20}, stream=True):
            kinds.append(event.type)
    assert kinds and kinds[0] == "message_start"
    assert e.value.type == "api_error" and "injected fault" in e.value.body["error"]["message"]
    monkeypatch.undo()
    assert claude.messages.create(**OK_BODY).type == "message"


@pytest.fixture(scope="module")
def guarded(tiny_server_model):
    """Keys, a rate limit of 4 a minute per key, and room for one request at a time (no queue)."""
    from conftest import RunningServer
    from quantserve.config import Limits

    server = RunningServer(tiny_server_model, api_keys=["k1", "k2", "k3"],
                           limits=Limits(rate_limit=4, max_concurrent_requests=1, max_queued_requests=0))
    yield server
    server.close()


def test_x_api_key_is_an_api_key(guarded):
    by_header = claude_client(guarded, api_key=None, default_headers={"x-api-key": "k1"})
    assert by_header.messages.create(**OK_BODY).type == "message"
    assert by_header.messages.count_tokens(model="tiny", messages=MSG).input_tokens > 0
    assert claude_client(guarded, api_key="k1").messages.create(**OK_BODY).type == "message"       # Bearer
    for wrong in (claude_client(guarded, api_key=None, default_headers={"x-api-key": "nope"}),
                  claude_client(guarded, api_key="nope")):
        with pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.create(**OK_BODY)
        assert e.value.status_code == 401 and e.value.type == "authentication_error"
        assert e.value.body["type"] == "error" and "x-api-key" in e.value.body["error"]["message"]
    missing = httpx.post(guarded.url + "/v1/messages/count_tokens", json={"model": "tiny", "messages": MSG})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.get(guarded.url + "/v1/models", headers={"x-api-key": "k1"}).status_code == 200


def test_the_rate_limit_counts_a_key_whichever_header_carries_it(guarded):
    by_header = claude_client(guarded, api_key=None, default_headers={"x-api-key": "k2"})
    by_bearer = claude_client(guarded, api_key="k2")
    for client in (by_header, by_bearer, by_header, by_bearer):
        assert client.messages.create(**OK_BODY).type == "message"
    made_up = claude_client(guarded, api_key="made-up", default_headers={"x-api-key": "k2"})
    with pytest.raises(anthropic.RateLimitError) as e:
        made_up.messages.create(**OK_BODY)
    assert e.value.type == "rate_limit_error" and int(e.value.response.headers["retry-after"]) >= 1


def test_a_full_server_is_529_overloaded(guarded):
    client = claude_client(guarded, api_key="k3")
    with client.messages.stream(model="tiny", max_tokens=2000, messages=MSG, extra_body=GREEDY) as stream:
        assert next(iter(stream)).type == "message_start"          # generating: the one slot is taken
        with pytest.raises(anthropic.OverloadedError) as e:
            client.messages.create(**OK_BODY)
    assert e.value.status_code == 529 and e.value.type == "overloaded_error"
    assert e.value.response.headers["retry-after"] == "1"
