"""response_format json_schema ends: objects get only the properties their schema names (OpenAI's
structured-output semantics), unless `additionalProperties` allows more. Checked on the grammar's
own token masks, through the server on the tiny model, and on the real default model."""
from __future__ import annotations

import copy
import json

import pytest

from conftest import TINY, RunningServer
from quantserve.guided import Grammar, closed_objects, json_schema_grammar

VOCAB = TINY["vocab_size"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
MSG = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    from quantserve.text import Tokenizer

    return Tokenizer(tiny_chat_model)


def accepts(tokenizer, schema: dict | None, text: str) -> bool:
    """Whether the per-token masks of `schema`'s grammar let a model write `text`, then stop."""
    guide = Grammar(tokenizer, VOCAB, json_schema_grammar(schema)).start()
    for token in tokenizer.hf.encode(text, add_special_tokens=False):
        if not guide.allowed(VOCAB)[token]:
            return False
        guide.accept(token)
    return bool(guide.allowed(VOCAB)[tokenizer.eos_token_ids[0]])


def with_(schema: dict, **changes) -> dict:
    return {**schema, **changes}


@pytest.mark.parametrize("schema, text, ok", [
    (PERSON, '{"name": "Ada", "age": 36}', True),
    (PERSON, '{"name": "Ada", "age": 36, "city": "London"}', False),
    (with_(PERSON, additionalProperties=True), '{"name": "Ada", "age": 36, "city": "London"}', True),
    (with_(PERSON, additionalProperties={"type": "integer"}), '{"name": "Ada", "age": 36, "born": 1815}', True),
    (with_(PERSON, additionalProperties={"type": "integer"}), '{"name": "Ada", "age": 36, "city": "London"}', False),
    (with_(PERSON, properties={**PERSON["properties"], "nick": {"type": "string"}}),
     '{"name": "Ada", "age": 36, "nick": "A"}', True),              # named but optional: still allowed
], ids=["named", "extra", "additional-true", "additional-schema", "additional-schema-mismatch", "optional-named"])
def test_only_named_properties_unless_additional_properties_allows(tokenizer, schema, text, ok):
    assert accepts(tokenizer, schema, text) is ok


NESTED = {"type": "object", "$defs": {"pet": {"type": "object", "properties": {"kind": {"type": "string"}}}},
          "properties": {"home": {"type": "object", "properties": {"city": {"type": "string"}}},
                         "kids": {"type": "array",
                                  "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                         "id": {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                                          {"type": "integer"}]},
                         "pet": {"$ref": "#/$defs/pet"}}}


@pytest.mark.parametrize("text, ok", [
    ('{"home": {"city": "Paris"}, "kids": [{"n": 1}], "id": {"a": 2}, "pet": {"kind": "cat"}}', True),
    ('{"home": {"city": "Paris", "zip": 1}}', False),
    ('{"kids": [{"n": 1, "m": 2}]}', False),
    ('{"id": {"a": 2, "b": 3}}', False),
    ('{"pet": {"kind": "cat", "age": 3}}', False),
], ids=["all-named", "in-properties", "in-items", "in-anyOf", "in-defs"])
def test_nested_objects_are_closed_too(tokenizer, text, ok):
    assert accepts(tokenizer, NESTED, text) is ok


def test_all_of_members_keep_each_others_keys(tokenizer):
    """allOf intersects its members: closing each over its own keys would refuse the others'."""
    schema = {"$defs": {"base": {"type": "object", "properties": {"a": {"type": "integer"}}}},
              "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"b": {"type": "integer"}}}]}
    assert accepts(tokenizer, schema, '{"a": 1, "b": 2}')
    assert not accepts(tokenizer, schema, '{"a": 1, "b": 2, "c": 3}')


def test_objects_naming_no_properties_stay_open(tokenizer):
    assert accepts(tokenizer, {"type": "object"}, '{"anything": 1}')
    assert accepts(tokenizer, None, '{"anything": 1}')              # json_object mode


def test_closing_copies_and_leaves_values_alone():
    schema = {"type": "object", "properties": {"k": {"const": {"properties": {"x": 1}}},
                                               "e": {"enum": [{"properties": {}}]}}}
    before = copy.deepcopy(schema)
    closed = closed_objects(schema)
    assert schema == before
    assert closed["additionalProperties"] is False
    assert closed["properties"] == schema["properties"]          # const / enum values are data, not schemas


@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


@pytest.mark.parametrize("seed", range(4))
def test_reply_closes_once_the_named_fields_are_written(client, seed):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=200, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert set(json.loads(choice.message.content)) == {"name", "age"}


def test_max_tokens_still_cuts_with_length(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=3, temperature=1.0, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


ISSUE_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]}


@pytest.mark.slow
def test_default_model_stops_after_the_named_fields(default_model):
    """The issue's case: before, these prompts ran on with invented fields to max_tokens."""
    from quantserve.config import EngineConfig

    server = RunningServer(default_model, EngineConfig(dtype="float32", session_len=2048, max_batch_size=4),
                           model_name="smol")
    try:
        client = server.client()
        for prompt in ("Describe a fictional character.", "What is the capital of France?", "Hello!"):
            for seed in (0, 1):
                r = client.chat.completions.create(
                    model="smol", messages=[{"role": "user", "content": prompt}], max_tokens=80, seed=seed,
                    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": ISSUE_SCHEMA}})
                choice = r.choices[0]
                assert choice.finish_reason == "stop", (prompt, seed, choice.message.content)
                assert set(json.loads(choice.message.content)) <= {"name", "age"}, choice.message.content
    finally:
        server.close()
