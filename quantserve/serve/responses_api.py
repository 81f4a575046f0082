"""OpenAI's Responses API: POST /v1/responses, GET / DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

A Responses body is translated into a chat request (instructions -> system message, input items
and the stored history of `previous_response_id` -> messages, text.format -> response_format)
and runs through the chat path (plan.chat_plan, Service, Chunker). Its choice deltas become
output items in one place, `Turn`, which also makes the typed stream events. Answers are kept in
memory (an LRU of `max_stored_responses`) so a later request can continue from them.
"""
from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from quantserve.serve.errors import APIError
from quantserve.serve.openai_app import (ERRORS, SSE, Chunker, ServerState, TicketStream, client_key,
                                         collect_unless_gone)
from quantserve.serve.plan import Plan, chat_plan
from quantserve.serve.protocol import (ChatCompletionRequest, ChatMessage, FunctionCall, FunctionDef,
                                       JsonSchemaFormat, NamedFunction, NamedToolChoice, ResponseFormat, Tool,
                                       ToolCall)
from quantserve.serve.responses import UsageCounter, now
from quantserve.serve.responses_protocol import (DeletedResponse, FunctionCallItem, InputItemList, MessageItem,
                                                 ReasoningItem,
                                                 ResponseObject, ResponsesRequest, joined)
from quantserve.serve.service import ChoiceDelta, Service
from quantserve.serve.tools import ParsedCall

CHAT_PARAMS = {"messages": "input", "response_format": "text.format"}    # chat_plan's names -> ours


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class StoredResponse:
    body: dict               # the response object, as returned
    items: list[dict]        # the conversation it answered (input items, with those of the responses before)


class ResponseStore:
    """Responses by id, least recently used first out past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self.entries[stored.body["id"]] = stored
        self.entries.move_to_end(stored.body["id"])
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)

    def get(self, rid: str, param: str | None = None) -> StoredResponse:
        stored = self.entries.get(rid)
        if stored is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param, "response_not_found")
        self.entries.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self.entries[rid]


# ---- request -> conversation -> chat request ------------------------------------------------

def item_dict(item) -> dict:
    """An input item as stored and listed: OpenAI's item shape, with an id."""
    if isinstance(item, MessageItem):
        part = {"type": "output_text", "text": joined(item.content), "annotations": []} if item.role == "assistant" \
            else {"type": "input_text", "text": joined(item.content)}
        return {"type": "message", "id": new_id("msg"), "role": item.role, "status": "completed", "content": [part]}
    if isinstance(item, ReasoningItem):
        return {**item.model_dump(exclude_none=True), "id": item.id or new_id("rs")}
    if isinstance(item, FunctionCallItem):
        return {"type": "function_call", "id": new_id("fc"), "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "status": "completed"}
    return {"type": "function_call_output", "id": new_id("fco"), "call_id": item.call_id, "output": joined(item.output),
            "status": "completed"}


def conversation(body: ResponsesRequest, store: ResponseStore) -> list[dict]:
    """The items this response answers: the previous response's conversation and output (its
    instructions are not carried over, as OpenAI does), then this request's input."""
    history: list[dict] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id, "previous_response_id")
        history = previous.items + previous.body["output"]
    inputs = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    return history + [item_dict(i) for i in inputs]


def chat_messages(items: list[dict]) -> list[ChatMessage]:
    """Items -> chat messages: function calls join the assistant message before them (or make
    one), function outputs are tool messages."""
    messages: list[ChatMessage] = []
    for item in items:
        if item["type"] == "message":
            messages.append(ChatMessage(role=item["role"], content="".join(p["text"] for p in item["content"])))
        elif item["type"] == "function_call":
            call = ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"], arguments=item["arguments"]))
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item["type"] == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=item["call_id"], content=item["output"]))
    return messages


def chat_request(body: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    messages = chat_messages(items)
    if body.instructions is not None:
        messages.insert(0, ChatMessage(role="system", content=body.instructions))
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = NamedToolChoice(function=NamedFunction(name=choice.name))
    tools = [Tool(function=FunctionDef(name=t.name, description=t.description, parameters=t.parameters))
             for t in body.tools] if body.tools else None
    return ChatCompletionRequest(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p, stream=body.stream, user=body.user,
                                 tools=tools, tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls,
                                 response_format=response_format(body), structured_outputs=body.structured_outputs,
                                 chat_template_kwargs=thinking_switch(body), priority=body.priority,
                                 timeout=body.timeout)


def thinking_switch(body: ResponsesRequest) -> dict | None:
    effort = body.reasoning.effort if body.reasoning else None
    return None if effort is None else {"enable_thinking": effort not in ("none", "minimal")}


def response_format(body: ResponsesRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    schema = JsonSchemaFormat(name=fmt.name, schema=fmt.schema_, strict=fmt.strict) if fmt.type == "json_schema" else None
    return ResponseFormat(type=fmt.type, json_schema=schema)


def plan_for(chat: ChatCompletionRequest, service: Service) -> Plan:
    """chat_plan, its refusals naming this API's fields."""
    try:
        return chat_plan(chat, service.model, service.limits)
    except APIError as e:
        e.param = CHAT_PARAMS.get(e.param, e.param)
        raise


# ---- choice deltas -> output items and stream events ----------------------------------------

class Turn:
    """The output items of one response, built from its choice deltas (streamed or not); each step
    returns the stream events it makes, less their sequence numbers. Output kinds (a message,
    function calls) are added here and only here."""

    def __init__(self):
        self.items: list[dict] = []
        self.message: dict | None = None          # the message item while its text streams
        self.thought: dict | None = None          # the reasoning item while its text streams
        self.finish_reason: str | None = None

    @property
    def status(self) -> Literal["completed", "incomplete"]:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def add(self, d: ChoiceDelta) -> list[dict]:
        events = self.reason(d.reasoning) if d.reasoning else []
        if d.text or d.finish_reason:
            events += self.close_reasoning()
        if d.text or (d.finish_reason and not d.tool_calls and not self.message_seen):
            events += self.text(d.text)            # without calls there is always a message, if empty
        if d.finish_reason:
            self.finish_reason = d.finish_reason
            events += self.close_message()
            for call in d.tool_calls:
                events += self.function_call(call)
        return events

    @property
    def message_seen(self) -> bool:
        return any(item["type"] == "message" for item in self.items)

    def reason(self, text: str) -> list[dict]:
        """--reasoning-parser: the <think> part as a reasoning item, before the message."""
        events = []
        if self.thought is None:
            self.thought = {"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "in_progress",
                            "content": [{"type": "reasoning_text", "text": ""}]}
            events.append(self.open(self.thought)[1])
        self.thought["content"][0]["text"] += text
        events.append({**self.at(self.thought), "type": "response.reasoning_text.delta", "delta": text})
        return events

    def close_reasoning(self) -> list[dict]:
        if self.thought is None:
            return []
        item, self.thought = self.thought, None
        item["status"] = "completed"
        return [{**self.at(item), "type": "response.reasoning_text.done", "text": item["content"][0]["text"]},
                self.done(item)]

    def at(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item), "content_index": 0}

    def open(self, item: dict) -> tuple[int, dict]:
        self.items.append(item)
        index = len(self.items) - 1
        return index, {"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}

    def done(self, item: dict) -> dict:
        return {"type": "response.output_item.done", "output_index": self.items.index(item),
                "item": copy.deepcopy(item)}

    def text(self, text: str) -> list[dict]:
        events = []
        if self.message is None:
            self.message = {"type": "message", "id": new_id("msg"), "role": "assistant", "status": "in_progress",
                            "content": []}
            events.append(self.open(self.message)[1])
            self.message["content"].append({"type": "output_text", "text": "", "annotations": []})
            events.append({**self.where(), "type": "response.content_part.added",
                           "part": copy.deepcopy(self.message["content"][0])})
        if text:
            self.message["content"][0]["text"] += text
            events.append({**self.where(), "type": "response.output_text.delta", "delta": text, "logprobs": []})
        return events

    def where(self) -> dict:
        return self.at(self.message)

    def close_message(self) -> list[dict]:
        if self.message is None:
            return []
        message, part = self.message, self.message["content"][0]
        message["status"] = self.status
        events = [{**self.where(), "type": "response.output_text.done", "text": part["text"], "logprobs": []},
                  {**self.where(), "type": "response.content_part.done", "part": copy.deepcopy(part)},
                  self.done(message)]
        self.message = None
        return events

    def function_call(self, call: ParsedCall) -> list[dict]:
        item = {"type": "function_call", "id": new_id("fc"), "call_id": call.to_openai()["id"], "name": call.name,
                "arguments": "", "status": "in_progress"}
        index, added = self.open(item)
        item.update(arguments=call.arguments, status="completed")
        where = {"item_id": item["id"], "output_index": index}
        return [added, {**where, "type": "response.function_call_arguments.delta", "delta": call.arguments},
                {**where, "type": "response.function_call_arguments.done", "name": call.name,
                 "arguments": call.arguments},
                self.done(item)]


def usage_body(usage: UsageCounter, reasoning_tokens: int = 0) -> dict:
    u = usage.body()
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": u["total_tokens"]}


class ResponseRun:
    """One response being generated: the chat stream under it, its Turn, and its response object."""

    def __init__(self, service: Service, request: ResponsesRequest, chat: ChatCompletionRequest, plan: Plan,
                 items: list[dict], store: ResponseStore):
        self.id, self.created = new_id("resp"), now()
        self.service, self.request, self.items, self.store = service, request, items, store
        self.params = plan.params[0]
        self.chunks = Chunker(service, self.id, chat, [plan], chat=True)
        self.turn = Turn()

    def body(self, status: str, error: dict | None = None) -> dict:
        r, done = self.request, status in ("completed", "incomplete")
        choice = r.tool_choice or "auto"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": r.model, "output": copy.deepcopy(self.turn.items),
                "usage": usage_body(self.chunks.usage, self.reasoning_tokens()) if done else None,
                "instructions": r.instructions, "previous_response_id": r.previous_response_id,
                "max_output_tokens": r.max_output_tokens, "temperature": self.params.temperature,
                "top_p": self.params.top_p, "tools": [t.model_dump() for t in r.tools or []],
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
                "parallel_tool_calls": r.parallel_tool_calls,
                "text": {"format": r.text.format.model_dump(by_alias=True, exclude_none=True)} if r.text
                else {"format": {"type": "text"}},
                "store": r.store, "metadata": r.metadata or {}}

    def reasoning_tokens(self) -> int:
        """The reply's thinking, counted in the model's tokens."""
        text = "".join(i["content"][0]["text"] for i in self.turn.items if i["type"] == "reasoning")
        return len(self.service.model.tokenizer.hf.encode(text, add_special_tokens=False)) if text else 0

    def finish(self) -> dict:
        body = self.body(self.turn.status)
        if self.request.store:
            self.store.put(StoredResponse(body, self.items))
        return body

    async def collect(self) -> dict:
        async with self.chunks.admitted():
            async for d in self.chunks.deltas():
                self.turn.add(d)
        return self.finish()

    async def events(self) -> AsyncIterator[dict]:
        """The typed stream events, numbered; a failure midway is an `error` then `response.failed`."""
        seq = 0

        def number(event: dict) -> dict:
            nonlocal seq
            seq += 1
            return {**event, "sequence_number": seq - 1}

        yield number({"type": "response.created", "response": self.body("in_progress")})
        yield number({"type": "response.in_progress", "response": self.body("in_progress")})
        try:
            async with self.chunks.admitted():
                async for d in self.chunks.deltas():
                    for event in self.turn.add(d):
                        yield number(event)
            body = self.finish()
            yield number({"type": f"response.{body['status']}", "response": body})
        except APIError as e:
            code = "server_error" if e.status >= 500 else e.code or "invalid_request"
            yield number({"type": "error", "code": code, "message": e.message, "param": e.param})
            yield number({"type": "response.failed", "response": self.body("failed", {"code": code, "message": e.message})})

    async def sse(self) -> AsyncIterator[str]:
        async for event in self.events():
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


# ---- routes ---------------------------------------------------------------------------------

async def answer(service: Service, request: Request, body: ResponsesRequest, store: ResponseStore,
                 lora: str | None) -> Response:
    """Plan (with LoRA adapter `lora`), then stream (SSE) or collect; the admission ticket is
    released however this ends."""
    items = conversation(body, store)
    ticket, streaming = service.reserve(), None
    try:
        chat = chat_request(body, items)
        plan = await asyncio.to_thread(plan_for, chat, service)
        plan.lora = lora
        service.metrics.prompt_tokens.inc(len(plan.prompt_ids))
        run = ResponseRun(service, body, chat, plan, items, store)
        if body.stream:
            streaming = TicketStream(run.sse(), ticket)       # releases the ticket itself
            return streaming
        return await collect_unless_gone(run.collect(), request)
    finally:
        if streaming is None:
            ticket.release()


def add_responses_routes(app: FastAPI, state: ServerState) -> None:
    store = ResponseStore(state.config.max_stored_responses)

    @app.post("/v1/responses", response_model=ResponseObject, responses={**ERRORS, **SSE})
    async def create_response(body: ResponsesRequest, request: Request):
        service, lora = await state.ready_with_adapter(body.model)
        service.check_rate(client_key(state, request))
        return await answer(service, request, body, store, lora)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS)
    async def get_response(response_id: str):
        return store.get(response_id).body

    @app.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=ERRORS)
    async def delete_response(response_id: str):
        store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=ERRORS)
    async def list_input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc", after: str | None = None):
        """The conversation the response answered (with the items of the responses before it)."""
        items = store.get(response_id).items
        items = items if order == "asc" else items[::-1]
        ids = [i["id"] for i in items]
        if after is not None and after not in ids:
            raise APIError(400, f"after: no input item '{after}' in this response", "after", "invalid_value")
        start = ids.index(after) + 1 if after is not None else 0
        page = items[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}
