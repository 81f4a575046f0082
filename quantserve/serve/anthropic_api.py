"""Anthropic's Messages API on the same server: POST /v1/messages and /v1/messages/count_tokens.

A body (anthropic_protocol.py) becomes the OpenAI chat request that asks the same, which runs as
the chat route runs (openai_app.respond: admission ticket, plan, Service, Chunker). Only the
answer's shape is Anthropic's: MessageBuilder turns the choice deltas into content blocks, as SSE
events while streaming and as one message otherwise, so both always hold the same blocks.
Errors on these paths come in Anthropic's shape (errors.py), a stream's as an `error` event.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

from quantserve.serve.anthropic_protocol import (AnthropicErrorResponse, CountTokensRequest, MessageResponse,
                                                 MessagesRequest, TokenCount)
from quantserve.serve.admission import admit
from quantserve.serve.errors import APIError
from quantserve.serve.openai_app import SSE, Chunker, ServerState, Wire, client_key, respond
from quantserve.serve.plan import chat_prompt_ids, check_generates
from quantserve.serve.service import ChoiceDelta, Service
from quantserve.serve.tools import ParsedCall

ERRORS = {s: {"model": AnthropicErrorResponse} for s in (400, 401, 404, 408, 413, 429, 500, 503, 529)}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}      # the rest: stop_sequence or end_turn

Event = tuple[str, dict]         # (SSE event name, its data)


def add_anthropic_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages", response_model=MessageResponse, responses={**ERRORS, **SSE})
    async def messages(body: MessagesRequest, request: Request):
        service, ticket = await admit(state, body.model, client_key(state, request))
        return await respond(service, ticket, request, body.chat(), chat=True, wire=WIRE)

    @app.post("/v1/messages/count_tokens", response_model=TokenCount, responses=ERRORS)
    async def count_tokens(body: CountTokensRequest):
        service, _ = await state.ready_with_adapter(body.model)
        check_generates(service.model)
        ids = await asyncio.to_thread(chat_prompt_ids, body.chat_request(), service.model)
        return {"input_tokens": len(ids)}


class MessageBuilder:
    """Choice deltas -> the message's content blocks, given as stream events and kept as the whole
    message. Every block is made here: a new kind of block is one more method like `text`."""

    def __init__(self, chunks: Chunker):
        self.chunks = chunks
        self.content: list[dict] = []
        self.open = False                    # the last block still takes deltas
        self.started = False
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def add(self, d: ChoiceDelta) -> list[Event]:
        events = self.begin()
        if d.reasoning:
            events += self.thinking(d.reasoning)
        if d.text:
            events += self.text(d.text)
        for call in d.tool_calls:
            events += self.tool_use(call)
        if d.finish_reason:
            self.stop_sequence = d.stop_word
            self.stop_reason = STOP_REASONS.get(d.finish_reason, "stop_sequence" if d.stop_word else "end_turn")
        return events

    def begin(self) -> list[Event]:
        """message_start, once: after the first delta, which brings the prompt's cache hits."""
        if self.started:
            return []
        self.started = True
        return [("message_start", {"type": "message_start", "message": {**self.message(), "content": []}})]

    def text(self, text: str) -> list[Event]:
        events = [] if self.open and self.content[-1]["type"] == "text" else self.close() + self.start("text", text="")
        self.content[-1]["text"] += text
        return events + [self.delta({"type": "text_delta", "text": text})]

    def thinking(self, text: str) -> list[Event]:
        """--reasoning-parser: the model's <think> part as a thinking block (no signature: it is
        not Anthropic's to verify)."""
        kind = "thinking"
        events = [] if self.open and self.content[-1]["type"] == kind else self.close() + self.start(
            kind, thinking="", signature="")
        self.content[-1]["thinking"] += text
        return events + [self.delta({"type": "thinking_delta", "thinking": text})]

    def tool_use(self, call: ParsedCall) -> list[Event]:
        """One whole block per call: the calls are known once the output is complete."""
        events = self.close() + self.start("tool_use", id=f"toolu_{uuid.uuid4().hex[:24]}", name=call.name, input={})
        self.content[-1]["input"] = json.loads(call.arguments)
        return events + [self.delta({"type": "input_json_delta", "partial_json": call.arguments})] + self.close()

    def start(self, kind: str, **fields) -> list[Event]:
        self.content.append({"type": kind, **fields})
        self.open = True
        return [("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                         "content_block": {"type": kind, **fields}})]

    def delta(self, delta: dict) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def close(self) -> list[Event]:
        if not self.open:
            return []
        self.open = False
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def finish(self) -> list[Event]:
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        return self.begin() + self.close() + [("message_delta", {"type": "message_delta", "delta": delta,
                                                                 "usage": self.usage()}),
                                              ("message_stop", {"type": "message_stop"})]

    def usage(self) -> dict:
        """Anthropic's input_tokens leave out the tokens read from the cache."""
        u = self.chunks.usage
        return {"input_tokens": u.prompt - u.cached, "output_tokens": sum(u.completion.values()),
                "cache_read_input_tokens": u.cached}

    def message(self) -> dict:
        return {"id": self.chunks.rid, "type": "message", "role": "assistant", "model": self.chunks.model,
                "content": self.content, "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": self.usage()}


async def events(service: Service, chunks: Chunker, builder: MessageBuilder) -> AsyncIterator[Event]:
    async with chunks.admitted():
        async for d in chunks.deltas():
            for event in builder.add(d):
                yield event
    for event in builder.finish():
        yield event


async def message_sse(service: Service, chunks: Chunker) -> AsyncIterator[str]:
    """The events as SSE; an error midway (the status is already 200) becomes an `error` event."""
    try:
        async for name, data in events(service, chunks, MessageBuilder(chunks)):
            yield sse_event(name, data)
    except APIError as e:
        yield sse_event("error", e.anthropic_body())


def sse_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def whole_message(service: Service, chunks: Chunker) -> dict:
    builder = MessageBuilder(chunks)
    async for _ in events(service, chunks, builder):
        pass
    return builder.message()


WIRE = Wire("msg_", message_sse, whole_message)
