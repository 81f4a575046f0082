"""--reasoning-parser: a thinking model's <think> part split from its answer, on every API.

The parser is checked on hand-worked texts cut at random places. End to end, a tiny model whose
chat template opens the think block (as DeepSeek-R1's does) replies inside its reasoning; the same
reasoning must come out as chat's reasoning_content, a Responses reasoning item and an Anthropic
thinking block, streamed and not, and `enable_thinking: false` (the template closes the block
itself) must turn it into the answer.
"""
from __future__ import annotations

import random
import shutil

import anthropic
import httpx
import pytest

from conftest import RunningServer
from quantserve.serve.reasoning import ReasoningStream, starts_inside

CASES = [
    ("<think>\nI reason here.\n</think>\n\nThe answer.", False, "I reason here.\n", "The answer."),
    ("I reason.</think>\n\nAnswer <b>x</b>", True, "I reason.", "Answer <b>x</b>"),
    ("Just an answer, <thin no tag", False, "", "Just an answer, <thin no tag"),
    ("<think>unfinished", False, "unfinished", ""),
    ("\n\n<think>x</think>y", False, "x", "y"),
    ("no think < / think > here </think", True, "no think < / think > here </think", ""),
]


@pytest.mark.parametrize("text, inside, reasoning, content", CASES)
def test_the_split_does_not_depend_on_where_the_deltas_are_cut(text, inside, reasoning, content):
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(6, len(text) - 1))))
        stream, got = ReasoningStream(inside), ["", ""]
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            part = stream.add(text[a:b])
            got = [got[0] + part.reasoning, got[1] + part.content]
        rest = stream.finish()
        assert (got[0] + rest.reasoning, got[1] + rest.content) == (reasoning, content), cuts


def test_a_prompt_that_opens_a_think_block_starts_inside():
    assert starts_inside("<|assistant|><think>\n")
    assert not starts_inside("<|assistant|><think>\n\n</think>\n\n")
    assert not starts_inside("<|user|>hi<|assistant|>")
    assert starts_inside("<think>a</think> answer <|user|>more<|assistant|><think>")


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
            "{% else %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinker(tiny_chat_model, tmp_path_factory):
    """The tiny chat model with a template that opens the think block, served with the parser."""
    path = tmp_path_factory.mktemp("thinker") / "m"
    shutil.copytree(tiny_chat_model, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)            # where transformers keeps a template
    server = RunningServer(path, reasoning_parser="deepseek_r1")
    yield server
    server.close()


ASK = [{"role": "user", "content": "Why is the sky blue?"}]


def raw_reply(server, messages, max_tokens=12, **template) -> str:
    """The model's reply text with no parser: a completion of the templated prompt."""
    ids = httpx.post(server.url + "/v1/tokenize", json={"messages": messages, **template}).json()["tokens"]
    return server.client().completions.create(model="tiny", prompt=ids, max_tokens=max_tokens,
                                              temperature=0).choices[0].text


def test_chat_gives_the_reply_as_reasoning_content(thinker):
    client = thinker.client()
    reply = raw_reply(thinker, ASK)
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0)
    message = r.choices[0].message
    assert message.reasoning_content == reply.removeprefix("\n") and reply.strip()
    assert not message.content
    streamed = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == ""


def test_enable_thinking_false_makes_it_all_answer(thinker):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    reply = raw_reply(thinker, ASK, **off)
    r = thinker.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0,
                                                 extra_body=off)
    assert r.choices[0].message.content == reply and not getattr(r.choices[0].message, "reasoning_content", None)


def test_responses_put_it_in_a_reasoning_item(thinker):
    client = thinker.client()
    chat = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0)
    r = client.responses.create(model="tiny", input=ASK[0]["content"], max_output_tokens=12, temperature=0)
    assert r.output[0].type == "reasoning"
    assert r.output[0].content[0].text == chat.choices[0].message.reasoning_content
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    with client.responses.stream(model="tiny", input=ASK[0]["content"], max_output_tokens=12, temperature=0,
                                 text={"format": {"type": "json_object"}}) as stream:
        kinds = [e.type for e in stream]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    again = client.responses.create(model="tiny", previous_response_id=r.id, input="More?", max_output_tokens=4)
    assert again.status in ("completed", "incomplete")             # the reasoning item is not replayed
    off = client.responses.create(model="tiny", input=ASK[0]["content"], max_output_tokens=12, temperature=0,
                                  reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"]


def test_anthropic_gives_a_thinking_block(thinker):
    client = anthropic.Anthropic(base_url=thinker.url, api_key="none", max_retries=0)
    chat = thinker.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=12, temperature=0)
    m = client.messages.create(model="tiny", max_tokens=12, messages=ASK, extra_body={"temperature": 0})
    assert m.content[0].type == "thinking"
    assert m.content[0].thinking == chat.choices[0].message.reasoning_content
    with client.messages.stream(model="tiny", max_tokens=12, messages=ASK, extra_body={"temperature": 0}) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(kinds) == {"thinking_delta"} and final.content[0].thinking == m.content[0].thinking
    history = [*ASK, {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": ""},
                                                       {"type": "text", "text": "Light scatters."}]},
               {"role": "user", "content": "And at sunset?"}]
    off = client.messages.create(model="tiny", max_tokens=12, messages=history, thinking={"type": "disabled"},
                                 extra_body={"temperature": 0})
    assert [b.type for b in off.content] == ["text"]


def test_reasoning_then_answer_split_where_the_model_closes_the_block(thinker):
    """A grammar makes the tiny model write '<reasoning></think>\\n\\n<answer>': the two halves
    land in reasoning_content and content, streamed and not, and on the Responses API."""
    import re

    client = thinker.client()
    shape = {"structured_outputs": {"regex": "[a-z]{2,8}</think>\n\n[a-z]{2,8}"}}
    text = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0,
                                          extra_body=shape)
    message = text.choices[0].message
    assert re.fullmatch("[a-z]{2,8}", message.reasoning_content) and re.fullmatch("[a-z]{2,8}", message.content)
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0, stream=True,
                                            extra_body=shape)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    r = client.responses.create(model="tiny", input=ASK[0]["content"], max_output_tokens=40, temperature=0,
                                extra_body=shape)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert (r.output[0].content[0].text, r.output_text) == (message.reasoning_content, message.content)
