"""Tool-call formats of each model family -> OpenAI tool calls, whole and streamed."""
from __future__ import annotations

import json

import pytest

from quantserve.serve.tools import (HermesParser, InternLM2Parser, Llama3Parser, ToolStream, parse_forced, parser_for,
                                    tools_system_prompt)

ARGS = {"city": "Paris", "days": 2}

OUTPUTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
               '</tool_call>', "Let me check."),
    "internlm2": ('Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
                  '{"city": "Paris", "days": 2}}<|action_end|>', "Let me check."),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', ""),
}
PARSERS = {"hermes": HermesParser, "internlm2": InternLM2Parser, "llama3": Llama3Parser}


@pytest.mark.parametrize("family", list(OUTPUTS))
def test_whole_output_parses_into_calls(family):
    text, content = OUTPUTS[family]
    got_content, calls = PARSERS[family]().split(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)]


@pytest.mark.parametrize("family", list(OUTPUTS))
def test_streamed_output_gives_the_same_content_and_calls(family):
    text, content = OUTPUTS[family]
    for step in (1, 2, 5):                       # deltas of every size, cutting markers anywhere
        stream = ToolStream(PARSERS[family]())
        streamed = "".join(stream.add(text[i:i + step]) for i in range(0, len(text), step))
        rest, calls = stream.finish()
        assert (streamed + rest).rstrip() == content
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)]
        assert "<" not in streamed                 # no marker fragment leaked as content


def test_parallel_calls_hermes_and_llama3():
    two = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
           '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>')
    assert [c.name for c in HermesParser().split(two)[1]] == ["a", "b"]
    llama = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}'
    assert [c.name for c in Llama3Parser().split(llama)[1]] == ["a", "b"]


def test_text_that_is_not_a_call_stays_content():
    for parser, text in ((HermesParser(), "use <tool_call> tags {broken"), (Llama3Parser(), "{not json at all"),
                         (InternLM2Parser(), "<|action_start|><|plugin|>\nnope<|action_end|>")):
        assert parser.split(text) == (text, [])
        stream = ToolStream(parser)
        streamed = "".join(stream.add(ch) for ch in text)
        rest, calls = stream.finish()
        assert streamed + rest == text and calls == []


def test_plain_text_streams_without_delay_except_a_possible_marker():
    stream = ToolStream(HermesParser())
    assert stream.add("Hello there") == "Hello there"
    assert stream.add(" <tool") == " "            # might be the start of <tool_call>: held
    assert stream.add("s are fun") == "<tools are fun"


def test_arguments_given_as_a_string_are_normalised():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    (call,) = HermesParser().split(text)[1]
    assert json.loads(call.arguments) == {"x": 1}
    assert call.to_openai()["type"] == "function" and call.to_openai()["id"].startswith("call_")


def test_forced_output_is_a_json_list_of_calls():
    calls = parse_forced('[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert parse_forced('[{"name": "f", "argum') == []


def test_parser_is_picked_from_the_chat_template():
    assert isinstance(parser_for("...<|action_start|><|plugin|>..."), InternLM2Parser)
    assert isinstance(parser_for("{{ '<tool_call>' }}"), HermesParser)
    assert isinstance(parser_for("<|python_tag|> ipython"), Llama3Parser)
    assert isinstance(parser_for("{{ messages }}"), HermesParser)
    assert isinstance(parser_for("{{ messages }}", "llama3"), Llama3Parser)


def test_tools_prompt_lists_every_tool():
    prompt = tools_system_prompt([{"name": "get_weather", "parameters": {"type": "object"}}, {"name": "f"}])
    assert '"name": "get_weather"' in prompt and '"name": "f"' in prompt and "<tool_call>" in prompt


def test_strings_inside_arguments_may_hold_separators_and_tags():
    llama = '{"name": "search", "parameters": {"q": "a;b"}}; {"name": "f", "parameters": {}}'
    assert [json.loads(c.arguments) for c in Llama3Parser().split(llama)[1]] == [{"q": "a;b"}, {}]
    hermes = '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> and <tool_call>"}}</tool_call>'
    (call,) = HermesParser().split(hermes)[1]
    assert json.loads(call.arguments) == {"s": "</tool_call> and <tool_call>"}


def test_arguments_that_are_not_an_object_are_not_a_call():
    text = '<tool_call>{"name": "f", "arguments": 5}</tool_call>'
    assert HermesParser().split(text) == (text, [])
    assert parse_forced('[{"name": "f", "arguments": [1]}]') == []
