"""Choice deltas -> OpenAI response bodies and stream chunks (plain dicts, JSON-ready)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from quantserve.engine.request import TokenLogprobs
from quantserve.serve.service import ChoiceDelta
from quantserve.text import Tokenizer


@dataclass
class ChoiceResult:
    """A whole choice, folded from its deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list = field(default_factory=list)
    reasoning: str = ""

    def add(self, d: ChoiceDelta) -> None:
        self.text += d.text
        self.reasoning += d.reasoning
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.tool_calls += d.tool_calls
        self.finish_reason = d.finish_reason or self.finish_reason


@dataclass
class UsageCounter:
    prompt: int = 0
    completion: dict[int, int] = field(default_factory=dict)
    cached: int = 0

    def add(self, d: ChoiceDelta) -> None:
        self.completion[d.index] = d.completion_tokens

    def body(self) -> dict:
        done = sum(self.completion.values())
        return {"prompt_tokens": self.prompt, "completion_tokens": done, "total_tokens": self.prompt + done,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


def now() -> int:
    return int(time.time())


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.hf.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
    def item(t: int, lp: float) -> dict:
        return {"token": token_text(tok, t), "logprob": max(lp, -9999.0), "bytes": list(tok.token_bytes(t))}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                        for t, e in zip(token_ids, entries)]}


def completion_logprobs(tok: Tokenizer, token_ids: list[int], entries: list[TokenLogprobs], offset0: int) -> dict:
    tokens = [token_text(tok, t) for t in token_ids]
    offsets, pos = [], offset0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [max(e.logprob, -9999.0) for e in entries],
            "top_logprobs": [{token_text(tok, i): max(v, -9999.0) for i, v in e.top} for e in entries],
            "text_offset": offsets}


def tool_calls_body(calls: list) -> list[dict]:
    return [c.to_openai() for c in calls]


def chat_response(rid: str, model: str, results: dict[int, ChoiceResult], usage: UsageCounter,
                  tok: Tokenizer, logprobs: bool) -> dict:
    choices = []
    for i, r in sorted(results.items()):
        message = {"role": "assistant", "content": r.text if (r.text or not r.tool_calls) else None}
        if r.reasoning:
            message["reasoning_content"] = r.reasoning
        if r.tool_calls:
            message["tool_calls"] = tool_calls_body(r.tool_calls)
        choices.append({"index": i, "message": message, "finish_reason": r.finish_reason,
                        "logprobs": chat_logprobs(tok, r.token_ids, r.logprobs) if logprobs else None})
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": usage.body()}


def chat_chunk(rid: str, model: str, d: ChoiceDelta | None, tok: Tokenizer, logprobs: bool,
               first: bool = False, usage: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model, "choices": []}
    if usage is not None:
        chunk["usage"] = usage
        return chunk
    delta: dict = {"role": "assistant", "content": ""} if first else {}
    if d.text:
        delta["content"] = d.text
    if d.reasoning:
        delta["reasoning_content"] = d.reasoning
    if d.tool_calls:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(tool_calls_body(d.tool_calls))]
    choice = {"index": d.index, "delta": delta, "finish_reason": d.finish_reason,
              "logprobs": chat_logprobs(tok, d.token_ids, d.logprobs) if logprobs and d.logprobs else None}
    chunk["choices"].append(choice)
    return chunk


def completion_response(rid: str, model: str, results: dict[int, ChoiceResult], usage: UsageCounter,
                        tok: Tokenizer, logprobs: bool, echo: dict[int, str]) -> dict:
    choices = []
    for i, r in sorted(results.items()):
        prefix = echo.get(i, "")
        lp = completion_logprobs(tok, r.token_ids, r.logprobs, len(prefix)) if logprobs else None
        choices.append({"index": i, "text": prefix + r.text, "logprobs": lp, "finish_reason": r.finish_reason})
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": usage.body()}


def completion_chunk(rid: str, model: str, d: ChoiceDelta | None, tok: Tokenizer, logprobs: bool,
                     prefix: str = "", offset: int = 0, usage: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": []}
    if usage is not None:
        chunk["usage"] = usage
        return chunk
    lp = completion_logprobs(tok, d.token_ids, d.logprobs, offset) if logprobs and d.logprobs else None
    chunk["choices"].append({"index": d.index, "text": prefix + d.text, "logprobs": lp,
                             "finish_reason": d.finish_reason})
    return chunk
