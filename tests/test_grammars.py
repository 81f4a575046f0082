"""Structured outputs beyond JSON schema: regex, choice and Lark / GBNF grammars, in vLLM's
`structured_outputs` and its older `guided_*` fields. Checked on the grammars' own token masks,
then through a real server on the tiny model with the official client (vLLM's fields go in
`extra_body`, as clients send them)."""
from __future__ import annotations

import json
import re

import openai
import pytest

from conftest import TINY
from quantserve.guided import Grammar, GrammarError, constraint_grammar

VOCAB = TINY["vocab_size"]
MSG = [{"role": "user", "content": "The capital of France is"}]
CITIES = ["Paris", "London", "Berlin", "Rome"]
# [0-9], not \d: llguidance's \d is every Unicode digit, of a newer Unicode than Python's re knows
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"

# a tiny command language, in Lark, in GBNF, and as the regex of the same (finite) language
COMMANDS_LARK = r'''
start: move | take
move: "go " DIR
take: "take " ITEM (" and " ITEM)?
DIR: "north" | "south" | "east" | "west"
ITEM: "key" | "lamp" | "sword"
'''
COMMANDS_GBNF = r'''
root ::= move | take
move ::= "go " dir
take ::= "take " item (" and " item)?
dir ::= "north" | "south" | "east" | "west"
item ::= "key" | "lamp" | "sword"
'''
ITEM = "(key|lamp|sword)"
COMMANDS_REGEX = rf"go (north|south|east|west)|take {ITEM}( and {ITEM})?"
# arithmetic: at most four numbers of up to three digits (bounded, so a random model ends it)
ARITHMETIC_LARK = r'''
start: NUMBER (OP NUMBER) ~ 0..3
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
'''
ARITHMETIC_REGEX = r"[0-9]{1,3}([-+*][0-9]{1,3}){0,3}"


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    from quantserve.text import Tokenizer

    return Tokenizer(tiny_chat_model)


def accepts(tokenizer, kind: str, value, text: str) -> bool:
    """Whether the per-token masks of the constraint let a model write `text`, then stop."""
    guide = Grammar(tokenizer, VOCAB, constraint_grammar(kind, value)).start()
    for token in tokenizer.hf.encode(text, add_special_tokens=False):
        if not guide.allowed(VOCAB)[token]:
            return False
        guide.accept(token)
    return bool(guide.allowed(VOCAB)[tokenizer.eos_token_ids[0]])


TRICKY = ["", 'say "hi"', "back\\slash", "two\nlines", "tab\there", "é日本", "🙂", "/a.*b/", "(x|y)", "x\x01y"]


def test_choice_accepts_each_literal_exactly(tokenizer):
    for text in TRICKY:
        assert accepts(tokenizer, "choice", TRICKY, text), text
    for text in ["say hi", "back\\\\slash", "(x|y)(x|y)", "aaa", "🙂🙂"]:
        assert not accepts(tokenizer, "choice", TRICKY, text), text


@pytest.mark.parametrize("text, ok", [("2024-01-31", True), ("2024-1-31", False), ("2024-01-311", False),
                                      ("date: 2024-01-31", False)])
def test_regex_matches_whole_text(tokenizer, text, ok):
    assert accepts(tokenizer, "regex", DATE, text) is ok


@pytest.mark.parametrize("text", ["go north", "take lamp", "take key and sword", "go up", "take", "go north ",
                                  "take lamp and key and sword"])
def test_lark_and_gbnf_grammars_are_the_same_language(tokenizer, text):
    expected = re.fullmatch(COMMANDS_REGEX, text) is not None
    assert accepts(tokenizer, "grammar", COMMANDS_LARK, text) is expected
    assert accepts(tokenizer, "grammar", COMMANDS_GBNF, text) is expected


def test_json_kinds(tokenizer):
    assert accepts(tokenizer, "json_object", True, '{"any": [1]}')
    assert not accepts(tokenizer, "json_object", True, "[1]")
    for schema in ({"type": "integer"}, '{"type": "integer"}'):
        assert accepts(tokenizer, "json", schema, "42") and not accepts(tokenizer, "json", schema, '"42"')


@pytest.mark.parametrize("kind, value, says", [
    ("regex", "(abc", "unclosed group"), ("regex", "(?=a)b", "look-around"),
    ("grammar", "start: foo", "unknown name"), ("grammar", 'root ::= ("a"', "Expected ')'"), ("grammar", "", "Empty"),
    ("json", "{not json", "not JSON"),
])
def test_invalid_constraints_fail_with_llguidance_message(tokenizer, kind, value, says):
    with pytest.raises(GrammarError, match=re.escape(says)):
        Grammar(tokenizer, VOCAB, constraint_grammar(kind, value))


# ---- through the server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


def chat(client, extra: dict, **kwargs):
    kwargs = {"max_tokens": 60, "temperature": 1.0, **kwargs}
    return client.chat.completions.create(model="tiny", messages=MSG, extra_body=extra, **kwargs)


def parses(grammar: str, regex: str, text: str) -> bool:
    """`text` is in the grammar's language: the lark package parses it, and the regex of the same
    language matches it."""
    import lark

    try:
        lark.Lark(grammar).parse(text)
    except lark.exceptions.LarkError:
        return False
    return re.fullmatch(regex, text) is not None


@pytest.mark.parametrize("seed", range(5))
def test_choice_is_one_of_the_choices_and_stops(client, seed):
    choice = chat(client, {"structured_outputs": {"choice": CITIES}}, seed=seed).choices[0]
    assert choice.message.content in CITIES and choice.finish_reason == "stop"


@pytest.mark.parametrize("seed", range(3))
def test_regex_fully_matches_in_chat_and_completions(client, seed):
    c = chat(client, {"structured_outputs": {"regex": DATE}}, seed=seed).choices[0]
    assert re.fullmatch(DATE, c.message.content) and c.finish_reason == "stop", c.message.content
    r = client.completions.create(model="tiny", prompt="Today is", max_tokens=60, temperature=1.0, seed=seed, n=2,
                                  extra_body={"structured_outputs": {"regex": DATE}})
    for choice in r.choices:
        assert re.fullmatch(DATE, choice.text) and choice.finish_reason == "stop", choice.text


def test_regex_streams(client):
    phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    stream = chat(client, {"guided_regex": phone}, seed=7, stream=True)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert re.fullmatch(phone, "".join(parts)) and finish == "stop", parts
    stream = client.completions.create(model="tiny", prompt="Call", max_tokens=60, seed=7, stream=True,
                                       extra_body={"structured_outputs": {"regex": phone}})
    assert re.fullmatch(phone, "".join(c.choices[0].text for c in stream if c.choices))


def test_max_tokens_still_cuts_a_regex_with_length(client):
    c = chat(client, {"structured_outputs": {"regex": "[a-z]{40}"}}, max_tokens=3, seed=0).choices[0]
    assert c.finish_reason == "length" and re.fullmatch("[a-z]{1,39}", c.message.content)


@pytest.mark.parametrize("grammar, regex", [(COMMANDS_LARK, COMMANDS_REGEX), (ARITHMETIC_LARK, ARITHMETIC_REGEX)],
                         ids=["commands", "arithmetic"])
@pytest.mark.parametrize("seed", range(3))
def test_lark_grammar_output_parses(client, grammar, regex, seed):
    c = chat(client, {"structured_outputs": {"grammar": grammar}}, seed=seed).choices[0]
    assert parses(grammar, regex, c.message.content) and c.finish_reason == "stop", c.message.content


@pytest.mark.parametrize("seed", range(3))
def test_gbnf_grammar_output_parses(client, seed):
    c = chat(client, {"structured_outputs": {"grammar": COMMANDS_GBNF}}, seed=seed).choices[0]
    assert parses(COMMANDS_LARK, COMMANDS_REGEX, c.message.content) and c.finish_reason == "stop"


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int), text


def test_older_guided_fields(client):
    assert chat(client, {"guided_choice": CITIES}, seed=1).choices[0].message.content in CITIES
    assert re.fullmatch(DATE, chat(client, {"guided_regex": DATE}, seed=1).choices[0].message.content)
    text = chat(client, {"guided_grammar": COMMANDS_GBNF}, seed=1).choices[0].message.content
    assert re.fullmatch(COMMANDS_REGEX, text), text
    check_person(chat(client, {"guided_json": PERSON}, seed=1, max_tokens=120).choices[0].message.content)
    r = client.completions.create(model="tiny", prompt="Pick", max_tokens=20, seed=1,
                                  extra_body={"guided_choice": CITIES})
    assert r.choices[0].text in CITIES


def test_json_constraints(client):
    for extra in ({"structured_outputs": {"json": PERSON}}, {"structured_outputs": {"json": json.dumps(PERSON)}},
                  {"guided_json": json.dumps(PERSON)}):
        check_person(chat(client, extra, seed=2, max_tokens=120).choices[0].message.content)
    # any object: a random model rarely closes one in time, so the masks check the rest (below)
    assert chat(client, {"structured_outputs": {"json_object": True}}, seed=2).choices[0].message.content[0] == "{"
    r = client.completions.create(model="tiny", prompt="A person:", max_tokens=120, seed=2, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
    check_person(r.choices[0].text)


def test_responses_api_structured_outputs(client):
    r = client.responses.create(model="tiny", input="Pick a city.", max_output_tokens=30, temperature=1.0,
                                extra_body={"structured_outputs": {"choice": CITIES}})
    assert r.status == "completed" and r.output_text in CITIES
    with client.responses.stream(model="tiny", input="A date?", max_output_tokens=30,
                                 extra_body={"structured_outputs": {"regex": DATE}}) as stream:
        final = stream.get_final_response()
    assert re.fullmatch(DATE, final.output_text)


BAD = [
    ("bad regex", {"structured_outputs": {"regex": "(abc"}}, "structured_outputs.regex", "unclosed group"),
    ("bad old regex", {"guided_regex": "[z-a]"}, "guided_regex", "invalid regex"),
    ("bad lark", {"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", "unknown name"),
    ("bad gbnf", {"guided_grammar": 'root ::= ("a"'}, "guided_grammar", "GBNF"),
    ("json not JSON", {"guided_json": "{nope"}, "guided_json", "not JSON"),
    ("two kinds", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("no kind", {"structured_outputs": {"json_object": False}}, "structured_outputs", "exactly one"),
    ("structural tag", {"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag",
     "not supported"),
    ("empty choice", {"guided_choice": []}, "guided_choice", "at least 1"),
    ("choice not strings", {"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice.1", "string"),
    ("old and new", {"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "guided_regex", "give one"),
    ("two old", {"guided_choice": ["a"], "guided_grammar": COMMANDS_LARK}, "guided_grammar", "give one"),
    ("with response_format", {"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice",
     "response_format"),
    ("with tools", {"guided_regex": "a", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "guided_regex", "tools"),
]


@pytest.mark.parametrize("extra, param, says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_constraints_are_a_400_naming_the_field(client, extra, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra, max_tokens=5)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert says in e.value.body["message"], e.value.body
    if "tools" not in extra:                  # completions take no tools
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body=extra)
        assert e.value.body["param"] == param, e.value.body
    assert chat(client, {"structured_outputs": {"choice": CITIES}}, seed=0).choices[0].message.content in CITIES


def test_responses_api_bad_constraints_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="hi", max_output_tokens=5,
                                extra_body={"structured_outputs": {"grammar": "start: foo"}})
    assert e.value.body["param"] == "structured_outputs.grammar"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="hi", max_output_tokens=5, text={"format": {"type": "json_object"}},
                                extra_body={"structured_outputs": {"regex": "a"}})
    assert e.value.body["param"] == "structured_outputs.regex"
    assert client.responses.create(model="tiny", input="hi", max_output_tokens=2).status == "incomplete"
