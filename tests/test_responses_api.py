"""OpenAI's Responses API (/v1/responses), driven by the official `openai` client against a real
server running the tiny chat model."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

PROMPT = "The capital of France is"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
PERSON_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


def chat_text(client, messages: list[dict], max_tokens: int) -> str:
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def prompt_tokens(server, messages: list[dict]) -> int:
    return httpx.post(server.url + "/v1/tokenize", json={"messages": messages}).json()["count"]


def test_greedy_output_text_is_the_chat_completion_text(client, tiny_server):
    r = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=12, temperature=0)
    user = [{"role": "user", "content": PROMPT}]
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat_text(client, user, 12) and r.output_text
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert r.usage.input_tokens == prompt_tokens(tiny_server, user)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    items = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there"}]},
             {"role": "user", "content": PROMPT}]
    listed = client.responses.create(model="tiny", input=items, max_output_tokens=12, temperature=0)
    as_chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": PROMPT}]
    assert listed.output_text == chat_text(client, as_chat, 12)
    assert listed.usage.input_tokens == prompt_tokens(tiny_server, as_chat)


def test_instructions_are_the_system_message(client, tiny_server):
    r = client.responses.create(model="tiny", instructions="You answer in French.", input=PROMPT,
                                max_output_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": PROMPT}]
    assert r.output_text == chat_text(client, messages, 12)
    assert r.usage.input_tokens == prompt_tokens(tiny_server, messages)
    assert r.instructions == "You answer in French."


def test_stream_deltas_make_the_text_in_the_right_event_order(client, tiny_server):
    kw = dict(model="tiny", input=PROMPT, max_output_tokens=12, temperature=0)
    full = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == full.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == full.output_text and final.usage.output_tokens == full.usage.output_tokens
    assert {e.response.id for e in (events[0], events[1], events[-1])} == {final.id}
    assert client.responses.retrieve(final.id).output_text == full.output_text      # a streamed answer is stored

    with httpx.stream("POST", tiny_server.url + "/v1/responses", json={**kw, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data] == types


def test_stream_helper_gives_the_final_response(client):
    with client.responses.stream(model="tiny", input="Describe a person.", max_output_tokens=200, temperature=0,
                                 text=PERSON_FORMAT) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text
    jsonschema.validate(json.loads(text), PERSON)


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete" and r.max_output_tokens == 3
    done = client.responses.create(model="tiny", input="Describe a person.", max_output_tokens=200, temperature=0,
                                   text=PERSON_FORMAT)
    assert done.status == "completed" and done.incomplete_details is None and done.output[0].status == "completed"


def test_forced_function_call_then_its_output_continues(client, tiny_server):
    kw = dict(model="tiny", input="Weather in Rome?", tools=[WEATHER], parallel_tool_calls=False,
              tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=200, temperature=0)
    r = client.responses.create(**kw)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert r.status == "completed" and r.tools[0].name == "get_weather"

    events = list(client.responses.create(**kw, stream=True))
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == done.arguments == call.arguments and done.name == "get_weather"

    answer = client.responses.create(model="tiny", previous_response_id=r.id, max_output_tokens=6, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    as_chat = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert answer.usage.input_tokens == prompt_tokens(tiny_server, as_chat)
    assert answer.output_text == chat_text(client, as_chat, 6) and answer.previous_response_id == r.id
    listed = client.responses.input_items.list(answer.id, order="asc")
    assert [i.type for i in listed.data] == ["message", "function_call", "function_call_output"]
    by_hand = client.responses.create(model="tiny", max_output_tokens=6, temperature=0, input=[    # history sent back
        {"role": "user", "content": "Weather in Rome?"}, *r.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert by_hand.output_text == answer.output_text and by_hand.usage.input_tokens == answer.usage.input_tokens


def test_previous_response_id_carries_the_conversation_but_not_the_instructions(client, tiny_server):
    first = client.responses.create(model="tiny", instructions="Be brief.", input="Hello", max_output_tokens=8,
                                    temperature=0)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input=PROMPT, max_output_tokens=8,
                                     temperature=0)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": PROMPT}]
    assert second.usage.input_tokens == prompt_tokens(tiny_server, history) > first.usage.input_tokens
    assert second.output_text == chat_text(client, history, 8)
    third = client.responses.create(model="tiny", previous_response_id=second.id, input="And Italy?",
                                    max_output_tokens=4, temperature=0)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "And Italy?"}]
    assert third.usage.input_tokens == prompt_tokens(tiny_server, history)


def test_get_delete_then_not_found(client, tiny_server):
    r = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=4, temperature=0,
                                metadata={"who": "test"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"who": "test"}
    deleted = httpx.delete(f"{tiny_server.url}/v1/responses/{r.id}")
    assert deleted.json() == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(r.id)
    assert e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", previous_response_id=r.id, input="hi", max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
    wrong = httpx.put(f"{tiny_server.url}/v1/responses/{r.id}")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, GET"        # both routes of the path
    unstored = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)


def test_the_store_keeps_the_most_recently_used(tiny_server_model):
    from conftest import RunningServer

    server = RunningServer(tiny_server_model, max_stored_responses=2)
    try:
        client = server.client()
        a, b, c = (client.responses.create(model="tiny", input=f"Hello {i}", max_output_tokens=2) for i in range(3))
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(a.id)                          # the oldest went out
        assert client.responses.retrieve(b.id).id == b.id              # b is now more recent than c
        client.responses.create(model="tiny", input="Hello 3", max_output_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(c.id)
        assert client.responses.retrieve(b.id).id == b.id
    finally:
        server.close()


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


@pytest.mark.parametrize("run", range(3))
def test_json_schema_text_format_validates(client, run):
    r = client.responses.create(model="tiny", input="Describe a person.", max_output_tokens=200, temperature=1.0,
                                text=PERSON_FORMAT)
    assert r.status == "completed" and r.text.format.name == "person"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    parsed = client.responses.parse(model="tiny", input="Describe a person.", max_output_tokens=200,
                                    temperature=1.0, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    obj = client.responses.create(model="tiny", input="Describe a person.", max_output_tokens=200, temperature=1.0,
                                  text={"format": {"type": "json_object"}})
    assert obj.output_text.startswith("{")


BAD = [
    ("unknown role", dict(input=[{"role": "wizard", "content": "hi"}]), "input.0.role"),
    ("image part", dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
     "input.0.content.0.type"),
    ("unknown item", dict(input=[{"type": "web_search_call", "id": "ws_1"}]), "input.0"),
    ("arguments not an object", dict(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]),
     "input.0.arguments"),
    ("empty input", dict(input=""), "input"),
    ("temperature", dict(input="hi", temperature=5), "temperature"),
    ("max_output_tokens zero", dict(input="hi", max_output_tokens=0), "max_output_tokens"),
    ("past the context", dict(input="hi", max_output_tokens=10**6), "input"),
    ("built-in tool", dict(input="hi", tools=[{"type": "web_search"}]), "tools.0.type"),
    ("tool_choice without tools", dict(input="hi", tool_choice="required"), None),
    ("schema missing", dict(input="hi", text={"format": {"type": "json_schema", "name": "x"}}), "text.format"),
    ("bad schema", dict(input="hi", text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}),
     "text.format"),
    ("metadata value", dict(input="hi", metadata={"k": "v" * 600}), "metadata.k"),
]


@pytest.mark.parametrize("fields,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", max_output_tokens=fields.pop("max_output_tokens", 2), **fields)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]
    assert client.responses.create(model="tiny", input=PROMPT, max_output_tokens=2).status == "incomplete"


def test_bad_input_items_page_and_unknown_model(client, tiny_server):
    r = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=2)
    page = client.responses.input_items.list(r.id, limit=1)
    assert len(page.data) == 1 and page.data[0].type == "message" and not page.has_more
    bad = httpx.get(f"{tiny_server.url}/v1/responses/{r.id}/input_items", params={"after": "msg_nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="hi")


def test_error_midstream_is_an_error_event_then_response_failed(client, tiny_server, monkeypatch):
    from conftest import fail_engine_step

    fail_engine_step(monkeypatch, tiny_server)
    events = list(client.responses.create(model="tiny", input=PROMPT, max_output_tokens=20, stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "injected fault" in events[-2].message and events[-1].response.status == "failed"
    assert "injected fault" in events[-1].response.error.message
    monkeypatch.undo()
    assert client.responses.create(model="tiny", input=PROMPT, max_output_tokens=2).output_text
