"""WebSocket sessions: one connection carries a whole conversation (`WS /v1/sessions/ws`).

Client -> server, JSON text messages:
  {"type": "session.start", "model", "system"?, ...default chat fields}   (optional: the first
       request may carry "model" and "system" instead)
  {"type": "request", "content": "user text" | "messages": [...], ...this turn's chat fields}
  {"type": "cancel"}   stops the turn in flight; its partial reply stays in the history
  {"type": "reset"}    clears the history (model, system and defaults stay)
  {"type": "close"}
Server -> client: session.started, delta {turn, text, tool_calls?, logprobs?}, done {turn,
finish_reason, usage, ttft_s}, error {turn?, error: OpenAI's body}, session.reset, session.closed.

Every turn is planned as a chat completion of the whole history (plan.chat_plan), so templates,
tools, limits and validation are the HTTP route's, and a turn's reply is the stateless call's.
Its engine request pins its full KV blocks for the session when it ends, so the next turn's
prompt, which starts with this one's prompt and reply, prefills only what is new. Reset, close
and a disconnect unpin them; a disconnect mid-turn aborts the turn's request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from quantserve.serve.errors import APIError, validation_message
from quantserve.serve.openai_app import client_key
from quantserve.serve.plan import chat_plan
from quantserve.serve.protocol import ChatCompletionRequest
from quantserve.serve.responses import chat_logprobs, tool_calls_body
from quantserve.serve.service import ChoiceDelta, Service

logger = logging.getLogger("quantserve.serve")

PATH = "/v1/sessions/ws"
MESSAGE_TYPES = ("session.start", "request", "cancel", "reset", "close")
SESSION_KEYS = ("type", "model", "system", "content", "messages")     # not chat fields of a turn


def add_session_route(app: FastAPI, state) -> None:
    @app.websocket(PATH)
    async def session_ws(ws: WebSocket):
        """A conversation on one connection: see quantserve/serve/ws_session.py."""
        await ws.accept()
        session = Session(ws, state)
        try:
            await session.serve()
        finally:
            await session.end()


@dataclass
class Turn:
    number: int
    messages: list[dict]                  # what this turn adds to the history before the reply
    prompt_tokens: int
    logprobs: bool
    started: float                        # when the request arrived: ttft_s counts from here
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None
    task: asyncio.Task | None = None

    def add(self, d: ChoiceDelta) -> None:
        if d.token_ids and self.ttft is None:
            self.ttft = time.monotonic() - self.started
        self.text += d.text
        self.completion_tokens = max(self.completion_tokens, d.completion_tokens)   # an abort event says 0
        self.cached_tokens = max(self.cached_tokens, d.cached_tokens)

    def reply(self) -> dict:
        message = {"role": "assistant", "content": self.text if (self.text or not self.tool_calls) else None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def done(self, finish_reason: str | None) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens, "cached_tokens": self.cached_tokens}
        ttft = None if self.ttft is None else round(self.ttft, 6)
        return {"type": "done", "turn": self.number, "finish_reason": finish_reason, "usage": usage, "ttft_s": ttft}


class Session:
    def __init__(self, ws: WebSocket, state):
        self.ws, self.state = ws, state
        self.id = f"sess-{uuid.uuid4().hex}"
        self.model: str | None = None
        self.system: str | None = None
        self.defaults: dict = {}
        self.history: list[dict] = []           # every message after the system one
        self.turns = 0
        self.turn: Turn | None = None           # the turn in flight
        self.pinned: Service | None = None      # the model whose engine holds this session's pin
        self.send_lock = asyncio.Lock()
        self.gone = False

    async def serve(self) -> None:
        """Read messages until close or disconnect; a bad one gets an error event, never the end."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.gone = True
                return
            try:
                event = parse_message(message)
                if event["type"] == "close":
                    return await self.close()
                await self.handle(event)
            except APIError as e:
                await self.send({"type": "error", "error": e.body()["error"]})

    async def handle(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.start":
            if self.model is not None:
                raise APIError(400, "the session has started already (reset clears its history)", "type",
                               "invalid_value")
            await self.start(event)
            await self.send({"type": "session.started", "session_id": self.id, "model": self.model})
        elif kind == "request":
            await self.request(event)
        elif kind == "cancel":
            await self.cancel(keep=True)
        elif kind == "reset":
            await self.cancel(keep=False)
            self.history = []
            self.unpin()
            await self.send({"type": "session.reset"})

    async def start(self, event: dict) -> None:
        """The session's model, system prompt and default chat fields, checked as a request would be."""
        if "messages" in event:
            raise APIError(400, "a session keeps its own history: send each user message as a request",
                           "messages", "invalid_value")
        model, system = event.get("model"), event.get("system")
        if not isinstance(model, str):
            raise APIError(400, "a session needs a model: name it in session.start or the first request", "model",
                           "invalid_value")
        if not isinstance(system, str | None):
            raise APIError(400, "system must be a string", "system", "invalid_value")
        await self.state.ready_with_adapter(model)  # 404 for a model not served, 503 while it loads
        self.model, self.system = model, system
        self.defaults = {k: v for k, v in event.items() if k not in SESSION_KEYS}
        try:
            self.turn_request([{"role": "user", "content": ""}], {})
        except APIError:
            self.model, self.system, self.defaults = None, None, {}
            raise

    async def request(self, event: dict) -> None:
        received = time.monotonic()
        if self.turn is not None:
            raise APIError(400, f"turn {self.turn.number} is still generating: wait for its done event or send "
                           "cancel", "type", "turn_in_flight")
        if self.model is None:
            await self.start({k: event[k] for k in ("model", "system") if k in event})
        elif "model" in event and event["model"] != self.model:
            raise APIError(400, f"this session serves {self.model!r}; open a new session for another model",
                           "model", "invalid_value")
        elif "system" in event and event["system"] != self.system:
            raise APIError(400, "the system prompt is set when the session starts; open a new session to change it",
                           "system", "invalid_value")
        new = turn_messages(event)
        req = self.turn_request(new, {k: v for k, v in event.items() if k not in SESSION_KEYS})
        service, lora = await self.state.ready_with_adapter(self.model)
        service.check_rate(client_key(self.state, self.ws))
        ticket = service.reserve()
        try:
            plan = await asyncio.to_thread(chat_plan, req, service.model, service.limits)
        except BaseException:
            ticket.release()
            raise
        plan.pin_owner, plan.lora = self.id, lora
        if self.pinned is not None and self.pinned is not service:      # the model was reloaded
            self.unpin()
        self.pinned = service
        self.turns += 1
        service.metrics.prompt_tokens.inc(len(plan.prompt_ids))
        self.turn = Turn(self.turns, new, len(plan.prompt_ids), req.logprobs, received)
        self.turn.task = asyncio.create_task(self.generate(self.turn, service, plan))
        # released however the task ends, even cancelled before its first step (a cancel right behind)
        self.turn.task.add_done_callback(lambda _: ticket.release())

    def turn_request(self, new: list[dict], fields: dict) -> ChatCompletionRequest:
        """The chat completion request of the whole history plus `new`, validated as HTTP's body is."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        body = {**self.defaults, **fields, "model": self.model, "messages": [*system, *self.history, *new],
                "stream": True}
        body.pop("stream_options", None)
        try:
            req = ChatCompletionRequest.model_validate_json(json.dumps(body))
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param, "invalid_value") from None
        if req.n != 1:
            raise APIError(400, "a session's turn has one reply: n must be 1", "n", "invalid_value")
        return req

    async def generate(self, turn: Turn, service: Service, plan) -> None:
        """Stream the turn's reply; at its end the turn joins the history and `done` is sent."""
        tok, reason = service.model.tokenizer, None
        try:
            async with service.admitted():
                async with aclosing(service.stream(plan, f"chatcmpl-{uuid.uuid4().hex}")) as deltas:
                    async for d in deltas:
                        turn.add(d)
                        event = delta_event(turn, d, tok)
                        # shielded: a cancel never cuts a delta that the turn's text already counts
                        if event is not None and not await asyncio.shield(self.send(event)):
                            return                      # the client is gone: closing the stream aborts
                        if d.finish_reason:
                            reason = d.finish_reason
            await self.finish(turn, reason)
        except Exception as e:
            if not isinstance(e, APIError):
                logger.exception("session turn failed")
                e = APIError(500, f"internal error: {type(e).__name__}: {e}")
            self.turn = None                            # a failed turn leaves the history as it was
            await self.send({"type": "error", "turn": turn.number, "error": e.body()["error"]})

    async def finish(self, turn: Turn, finish_reason: str) -> None:
        """Into the history first (no await between), then tell the client."""
        self.history += [*turn.messages, turn.reply()]
        self.turn = None
        await self.send(turn.done(finish_reason))

    async def cancel(self, keep: bool) -> None:
        """Stop the turn in flight (its engine request is aborted); keep its partial reply or drop it.
        With no turn in flight (it may have just ended) there is nothing to do."""
        turn = self.turn
        if turn is None:
            return
        turn.task.cancel()
        await asyncio.gather(turn.task, return_exceptions=True)
        if self.turn is turn:                           # it had not finished on its own meanwhile
            if keep:
                await self.finish(turn, "cancelled")
            self.turn = None

    def unpin(self) -> None:
        """After the aborts sent before it (the engine's commands run in order)."""
        if self.pinned is not None:
            self.pinned.engine.unpin(self.id)

    async def close(self) -> None:
        await self.cancel(keep=False)
        await self.send({"type": "session.closed"})
        if not self.gone:
            await self.ws.close()

    async def end(self) -> None:
        """However the session ends: no turn left generating, no block left pinned."""
        await self.cancel(keep=False)
        self.unpin()
        self.pinned = None

    async def send(self, event: dict) -> bool:
        """False once the client is gone (the reader then sees its disconnect)."""
        if self.gone:
            return False
        try:
            async with self.send_lock:
                await self.ws.send_json(event)
            return True
        except (WebSocketDisconnect, RuntimeError):
            self.gone = True
            return False


def parse_message(message: dict) -> dict:
    raw = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
    try:
        event = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"a message must be a JSON object: {e}", None, "invalid_value") from None
    if not isinstance(event, dict):
        raise APIError(400, "a message must be a JSON object", None, "invalid_value")
    if event.get("type") not in MESSAGE_TYPES:
        raise APIError(400, f"type must be one of {', '.join(MESSAGE_TYPES)}; got {event.get('type')!r}",
                       "type", "invalid_value")
    return event


def turn_messages(event: dict) -> list[dict]:
    """A request's `content` (one user message) or `messages` (tool results, several messages)."""
    if ("content" in event) == ("messages" in event):
        raise APIError(400, "a request needs exactly one of 'content' (the user's text) and 'messages'",
                       "content", "invalid_value")
    if "content" in event:
        return [{"role": "user", "content": event["content"]}]
    if not isinstance(event["messages"], list) or not event["messages"]:
        raise APIError(400, "messages must be a non-empty list of chat messages", "messages", "invalid_value")
    return event["messages"]


def delta_event(turn: Turn, d: ChoiceDelta, tok) -> dict | None:
    event: dict = {"type": "delta", "turn": turn.number, "text": d.text}
    if d.tool_calls:
        calls = tool_calls_body(d.tool_calls)       # ids made once: the history keeps the same ones
        turn.tool_calls += calls
        event["tool_calls"] = calls
    if turn.logprobs and d.logprobs:
        event["logprobs"] = chat_logprobs(tok, d.token_ids, d.logprobs)["content"]
    return event if (d.text or "tool_calls" in event or "logprobs" in event) else None
