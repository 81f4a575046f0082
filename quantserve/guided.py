"""Constrained decoding: grammars (JSON schema, Lark) -> per-request token masks.

llguidance does the grammar work (an Earley parser over the tokenizer's byte trie, ~1 ms a
mask). A `Grammar` is compiled once per request body and validated before the request reaches
the engine; each request then gets its own `GrammarGuide` (the engine's `Guide` protocol), which
says which tokens may come next and consumes the one that was sampled.
"""
from __future__ import annotations

import json
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
        self.grammar = grammar

    def start(self) -> GrammarGuide:
        from llguidance import LLMatcher

        return GrammarGuide(LLMatcher(self.ll, self.grammar, log_level=0))


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
        return LLMatcher.grammar_from_json_schema(json.dumps(schema or ANY_JSON_OBJECT), defaults=JSON_STYLE)
    except ValueError as e:
        raise GrammarError(str(e)) from None


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
