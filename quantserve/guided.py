"""Constrained decoding: grammars (JSON schema, regex, choice, Lark / GBNF) -> per-request token masks.

llguidance does the grammar work (an Earley parser over the tokenizer's byte trie, ~1 ms a
mask). A `Grammar` is compiled once per request body and validated before the request reaches
the engine; each request then gets its own `GrammarGuide` (the engine's `Guide` protocol), which
says which tokens may come next and consumes the one that was sampled.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np
import torch

ANY_JSON_OBJECT = {"type": "object"}
# json.dumps spacing and nothing else: free whitespace lets a model pad forever
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema or grammar is invalid; the message says where."""


@lru_cache(maxsize=4)
def _ll_tokenizer(hf_tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))


class Grammar:
    """A validated grammar for one tokenizer; start() gives a fresh matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str):
        from llguidance import LLMatcher

        self.ll = _ll_tokenizer(tokenizer.hf, vocab_size, tuple(tokenizer.eos_token_ids))
        error = LLMatcher.validate_grammar(grammar, self.ll)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error)
        # the first mask builds the lexer (seconds for a regex like (a{1000}){1000}): built here, off
        # the engine's thread, where a grammar that fails its limits is still a refusal; each
        # request gets a copy with it built
        self.first = LLMatcher(self.ll, grammar, log_level=0)
        self.first.compute_bitmask()
        if self.first.is_error():
            raise GrammarError(self.first.get_error().split("\n")[0])

    def start(self) -> GrammarGuide:
        return GrammarGuide(self.first.deep_copy())


class GrammarGuide:
    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[V] bool: tokens the grammar accepts next (EOS only once it is complete)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:vocab_size].astype(bool))

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


def json_schema_grammar(schema: dict | None) -> str:
    """Grammar for one JSON value matching `schema` (any JSON object when None)."""
    from llguidance import LLMatcher

    if schema is not None and not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        closed = closed_objects(schema or ANY_JSON_OBJECT)
        return LLMatcher.grammar_from_json_schema(json.dumps(closed), defaults=JSON_STYLE)
    except ValueError as e:
        raise GrammarError(str(e)) from None


def regex_grammar(pattern: str) -> str:
    """Grammar for text that fully matches `pattern` (Rust's regex syntax: no look-around, no
    backreferences; an invalid one fails in Grammar)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: list[str]) -> str:
    """Grammar for exactly one of `choices`: a Lark alternation of their literals (JSON string
    escapes are Lark's)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


# a GBNF rule (`name ::= ...`); Lark writes `name:` (llguidance's any_to_lark looks for `start:`,
# and so takes a Lark `?start:` for GBNF)
GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z0-9_-]+\s*::=")


def lark_grammar(text: str) -> str:
    """Grammar from a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's
    `root ::= ...`, converted to Lark); an invalid Lark grammar fails in Grammar."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if GBNF_RULE.search(text):
        try:
            text = gbnf_to_lark(text)
        except Exception as e:      # the converter is a hand-written parser: any failure is the grammar's
            raise GrammarError(f"not a GBNF grammar: {e}") from None
    return LLMatcher.grammar_from_lark(text)


def constraint_grammar(kind: str, value) -> str:
    """The grammar of one output constraint, by vLLM's names: json (a schema, or its JSON text),
    json_object, regex, choice, grammar (Lark or GBNF)."""
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the schema is not JSON: {e}") from None
    builders = {"json": json_schema_grammar, "json_object": lambda _: json_schema_grammar(None),
                "regex": regex_grammar, "choice": choice_grammar, "grammar": lark_grammar}
    return builders[kind](value)


# keywords whose values are schemas that describe the value itself (not `not` / `if`, where a
# closed object would flip the meaning, nor allOf, handled apart)
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMA_ITEMS = ("anyOf", "oneOf", "prefixItems", "items", "additionalItems", "additionalProperties")
# an object using these may take keys its `properties` do not list: it is left open
OPEN_ENDED = ("anyOf", "oneOf", "patternProperties", "if", "dependentSchemas")


def closed_objects(schema: dict) -> dict:
    """`schema` with OpenAI's structured-output semantics (xgrammar's strict mode): an object that
    names its properties gets only those, unless it says `additionalProperties` itself. Plain
    JSON Schema allows any other key, so a model would keep inventing fields until max_tokens.
    Objects naming no properties ({"type": "object"}) stay open."""
    return _close(schema, schema, composed_refs(schema), closable=True)


def _close(node, root: dict, composed: set[str], closable: bool):
    if isinstance(node, list):
        return [_close(n, root, composed, True) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            defs = key in ("$defs", "definitions")
            out[key] = {name: _close(sub, root, composed, not (defs and f"#/{key}/{name}" in composed))
                        for name, sub in out[key].items()}
    for key in SUBSCHEMA_ITEMS:
        if key in out:
            out[key] = _close(out[key], root, composed, True)
    members = out.get("allOf")
    if isinstance(members, list):
        # allOf intersects: a member closed over its own keys would refuse its siblings' keys
        out["allOf"] = [_close(m, root, composed, len(members) == 1) for m in members]
    names = property_names(out, root) if closable and "additionalProperties" not in out else None
    if names and ("properties" in out or "allOf" in out):
        out["properties"] = {**{n: {} for n in names}, **out.get("properties", {})}
        out["additionalProperties"] = False
    return out


def property_names(schema: dict, root: dict, depth: int = 0) -> list[str] | None:
    """The keys an object schema names, with its allOf members' and $ref target's; None when
    some of them cannot be known."""
    if depth > 16 or not isinstance(schema, dict) or any(k in schema for k in OPEN_ENDED):
        return None
    names: list[str] = []
    for part in ([resolve_local_ref(schema["$ref"], root)] if "$ref" in schema else []) + (schema.get("allOf") or []):
        inner = property_names(part, root, depth + 1)
        if inner is None:
            return None
        names += [n for n in inner if n not in names]
    return names + [n for n in schema.get("properties") or {} if n not in names]


def resolve_local_ref(ref, root: dict) -> dict | None:
    """The schema `#/a/b` points at inside `root`; None for other references."""
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def composed_refs(schema: dict) -> set[str]:
    """$refs combined with other keys (allOf siblings, or `properties` beside the $ref): their
    targets are merged with those keys, so they must stay open themselves."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        members = node.get("allOf")
        if isinstance(members, list) and len(members) > 1:
            found |= {m["$ref"] for m in members if isinstance(m, dict) and isinstance(m.get("$ref"), str)}
        if isinstance(node.get("$ref"), str) and "properties" in node:
            found.add(node["$ref"])
        for key in (*SUBSCHEMA_MAPS, *SUBSCHEMA_ITEMS, "allOf"):
            value = node.get(key)
            stack.extend(value.values() if key in SUBSCHEMA_MAPS and isinstance(value, dict)
                         else value if isinstance(value, list) else [value])
    return found


def tool_calls_schema(tools: list[dict], parallel: bool) -> dict:
    """JSON schema of forced tool calls: a list of {"name", "arguments"} objects, each naming one
    of `tools` with arguments matching its parameters (one call unless parallel)."""
    calls = [{"type": "object",
              "properties": {"name": {"const": t["name"]},
                             "arguments": t.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools]
    schema: dict = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema
