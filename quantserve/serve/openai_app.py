"""The OpenAI-compatible HTTP server (FastAPI), with Anthropic's Messages API beside it (anthropic_api.py).

Routes parse a body (protocol.py), plan it (plan.py), run it (service.py) and shape the answer
(responses.py). /health is 503 until the model is loaded, and while an engine is dead or restarting.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError

from quantserve.config import ServerConfig
from quantserve.serve.admission import admit, until
from quantserve.serve.embeddings import add_embedding_routes
from quantserve.serve.errors import APIError, error_body, install_error_handlers, validation_message
from quantserve.serve.metrics import ServerMetrics
from quantserve.serve.middleware import APIKeyAuth, BodyLimit
from quantserve.serve.model_admin import add_model_admin_routes
from quantserve.serve.plan import Plan, chat_plan, completion_plans, encode_chat
from quantserve.serve.registry import ModelRegistry
from quantserve.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                       CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                       ModelList, TokenizeRequest, TokenizeResponse)
from quantserve.serve.responses import (ChoiceResult, UsageCounter, chat_chunk, chat_response, completion_chunk,
                                        completion_response)
from quantserve.serve.service import ChoiceDelta, Service, Ticket

logger = logging.getLogger("quantserve.serve")

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 500, 503)}
SSE = {200: {"content": {"text/event-stream": {}}}}


class ServerState:
    """The models served (each 503 while it loads) and the metrics they share."""

    def __init__(self, config: ServerConfig, models: ModelRegistry | None = None):
        self.config = config
        self.models = models or ModelRegistry(keep_alive=config.keep_alive)
        self.metrics = ServerMetrics()

    async def ready(self, model: str | None = None, keep_alive: float | None = None) -> Service:
        return await self.models.acquire(model, keep_alive)

    async def ready_with_adapter(self, model: str | None = None,
                                 keep_alive: float | None = None) -> tuple[Service, str | None]:
        """A model's Service, or a LoRA adapter's base model's and the adapter's name."""
        base, lora = self.models.resolve(model)
        return await self.ready(base, keep_alive), lora

    @property
    def service(self) -> Service:
        """The first model's Service."""
        return self.models.get()

    def check_health(self) -> None:
        """503 unless every model is loaded (or unloaded for idleness) and its engine alive."""
        self.models.check()


def build_app(state: ServerState, ui=None) -> FastAPI:
    """The API; with `ui` (a Gradio Blocks) the chat page is served at `/` next to it."""
    cfg = state.config
    docs = {} if not cfg.disable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    grpc = None
    if cfg.grpc_port is not None:         # started and stopped with the app, so it shares uvicorn's event loop
        from quantserve.serve.grpc_service import grpc_lifespan

        grpc = grpc_lifespan(state)
    app = FastAPI(title="quantserve", description="OpenAI-compatible API for quantized LLMs", version="0.1.0",
                  lifespan=state.models.lifespan(cfg.step_timeout, grpc), **docs)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes, timeout=cfg.connections.timeout_request_read)
    app.add_middleware(APIKeyAuth, api_keys=cfg.api_keys, admin_keys=cfg.admin_api_keys)
    app.add_middleware(CORSMiddleware, allow_origins=cfg.allow_origins, allow_credentials=cfg.allow_credentials,
                       allow_methods=cfg.allow_methods, allow_headers=cfg.allow_headers)
    add_info_routes(app, state, root_redirect=ui is None)
    add_generation_routes(app, state)
    add_embedding_routes(app, state)
    # imported here: these modules build on respond() and the helpers below
    from quantserve.serve.anthropic_api import add_anthropic_routes
    from quantserve.serve.responses_api import add_responses_routes
    from quantserve.serve.ws_session import add_session_route

    add_responses_routes(app, state)
    add_anthropic_routes(app, state)
    add_model_admin_routes(app, state)
    add_websocket_route(app, state)
    add_session_route(app, state)
    drop_422_from_openapi(app)
    if ui is not None:
        import gradio as gr

        app = gr.mount_gradio_app(app, ui, path="/", footer_links=[])
    return app


def add_info_routes(app: FastAPI, state: ServerState, root_redirect: bool = True) -> None:
    if root_redirect:
        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/docs")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        state.check_health()
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models():
        cards = state.models.cards()
        if not cards:
            state.check_health()
        return {"object": "list", "data": cards}

    @app.get("/info", responses=ERRORS)
    async def info(model: str | None = None):
        """A served model's precision, capacity and memory table (shown by the web UI)."""
        base, _ = state.models.resolve(model)              # an adapter: its base model's
        service = await state.ready(base)
        name = base or state.models.default
        return {"model": name, "path": state.models.slots[name].card.get("root"), **service.engine.engine.describe()}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        body = state.metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest):
        service, _ = await state.ready_with_adapter(body.model)        # an adapter tokenizes as its model
        model = service.model
        if body.messages is not None:
            ids = await asyncio.to_thread(encode_chat, body.messages, model, [], True, body.chat_template_kwargs)
        else:
            ids = await asyncio.to_thread(model.tokenizer.hf.encode, body.prompt,
                                          add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.session_len}

    @app.post("/v1/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest):
        service, _ = await state.ready_with_adapter(body.model)
        vocab = service.model.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens", "invalid_value")
        return {"prompt": await asyncio.to_thread(service.model.tokenizer.hf.decode, body.tokens)}


def client_key(state: ServerState, conn: Request | WebSocket) -> str:
    """Rate limits count per API key when keys are configured (the middleware checked it),
    otherwise per client address: a made-up header must not buy a fresh budget."""
    if state.config.api_keys:
        return conn.scope.get("state", {}).get("api_key", "")     # the key APIKeyAuth accepted
    return conn.client.host if conn.client else "unknown"


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **SSE})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        service, ticket = await admit(state, body.model, client_key(state, request), body.keep_alive)
        return await respond(service, ticket, request, body, chat=True)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, **SSE})
    async def completions(body: CompletionRequest, request: Request):
        service, ticket = await admit(state, body.model, client_key(state, request), body.keep_alive)
        return await respond(service, ticket, request, body, chat=False)


@dataclass(frozen=True)
class Wire:
    """How one API shapes an answer from a Chunker: its id prefix, its SSE stream and its whole body."""
    id_prefix: str
    stream: Callable[[Service, Chunker], AsyncIterator[str]]
    whole: Callable[[Service, Chunker], Awaitable[dict]]


async def respond(service: Service, ticket: Ticket, request: Request, body, chat: bool,
                  wire: Wire | None = None) -> Response:
    """Plan, then stream (SSE) or collect, in OpenAI's shapes unless `wire` says otherwise, under the
    name of the model that took it (an overflow); the admission ticket is released however this ends."""
    streaming, wire = None, wire or Wire("chatcmpl-" if chat else "cmpl-", sse, collect)
    try:
        chunks = await plan_chunks(service, body, chat, wire.id_prefix, ticket.lora)
        chunks.model = ticket.overflow or chunks.model
        if body.stream:
            streaming = TicketStream(wire.stream(service, chunks), ticket)    # releases the ticket itself
            return streaming
        return await collect_unless_gone(wire.whole(service, chunks), request, ticket.headers)
    finally:
        if streaming is None:
            ticket.release()


async def plan_chunks(service: Service, body, chat: bool, id_prefix: str, lora: str | None = None) -> Chunker:
    """Plan a chat or completions body (refusing what cannot run) for LoRA adapter `lora`; count its prompt tokens."""
    if chat:
        plans = [await asyncio.to_thread(chat_plan, body, service.model, service.limits)]
    else:
        plans = await asyncio.to_thread(completion_plans, body, service.model, service.limits)
    for plan in plans:
        plan.lora = lora
    rid = f"{id_prefix}{uuid.uuid4().hex}"
    service.metrics.prompt_tokens.inc(sum(len(p.prompt_ids) for p in plans))
    return Chunker(service, rid, body, plans, chat)


class TicketStream(StreamingResponse):
    """An SSE response that releases its admission ticket when it ends, however it ends."""

    def __init__(self, content, ticket):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ticket.headers})
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def collect_unless_gone(whole: Awaitable[dict], request: Request, headers: dict | None = None) -> Response:
    """The whole answer; if the client disconnects first, stop generating (its KV is freed)."""
    task = asyncio.create_task(whole)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
    return JSONResponse(task.result(), headers=headers)


class Chunker:
    """Merges the plans' choice streams and shapes chunks / the final body."""

    def __init__(self, service: Service, rid: str, body, plans: list[Plan], chat: bool):
        self.service, self.rid, self.body, self.plans, self.chat = service, rid, body, plans, chat
        self.model = body.model
        self.tok = service.model.tokenizer
        self.logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        self.usage = UsageCounter(prompt=sum(len(p.prompt_ids) for p in plans))
        self.echo = {p.first_index + j: p.echo for p in plans for j in range(len(p.params)) if p.echo}
        self.offsets: dict[int, int] = {}       # choice -> characters sent so far (chunks' text_offset)
        self.deadline = service.deadline(body.timeout)

    def admitted(self):          # a generation slot, by the request's priority, within its deadline
        return self.service.admitted(self.body.priority, self.deadline)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        streams = [self.service.stream(p, f"{self.rid}-{k}") for k, p in enumerate(self.plans)]
        firsts = {p.first_index for p in self.plans}
        counted: set[int] = set()
        async for d in until(self.deadline, merge(streams), self.service.metrics):
            self.usage.add(d)
            if d.index in firsts and d.index not in counted:      # a prompt's cache hits, once
                counted.add(d.index)
                self.usage.cached += d.cached_tokens
            yield d

    def chunk(self, d: ChoiceDelta) -> dict:
        first = d.index not in self.offsets
        if self.chat:
            self.offsets[d.index] = 0
            return chat_chunk(self.rid, self.model, d, self.tok, self.logprobs, first=first)
        prefix = self.echo.get(d.index, "") if first else ""
        offset = self.offsets.get(d.index, 0) + len(prefix)
        self.offsets[d.index] = offset + len(d.text)
        return completion_chunk(self.rid, self.model, d, self.tok, self.logprobs, prefix, offset)

    def usage_chunk(self) -> dict | None:
        opts = self.body.stream_options
        if not (opts and opts.include_usage):
            return None
        make = chat_chunk if self.chat else completion_chunk
        return make(self.rid, self.model, None, self.tok, False, usage=self.usage.body())


async def merge(streams: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; closing this closes all of them."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it):
        try:
            async for item in it:
                await queue.put(item)
        except Exception as e:
            await queue.put(e)
        await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(service: Service, chunks: Chunker) -> dict:
    results: dict[int, ChoiceResult] = {}
    async with chunks.admitted():
        async for d in chunks.deltas():
            results.setdefault(d.index, ChoiceResult()).add(d)
    if chunks.chat:
        return chat_response(chunks.rid, chunks.model, results, chunks.usage, chunks.tok, chunks.logprobs)
    return completion_response(chunks.rid, chunks.model, results, chunks.usage, chunks.tok, chunks.logprobs,
                               chunks.echo)


async def sse(service: Service, chunks: Chunker) -> AsyncIterator[str]:
    async for item in stream_chunks(service, chunks):
        yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def stream_chunks(service: Service, chunks: Chunker) -> AsyncIterator[dict]:
    """Chunks, then the usage chunk if asked; an error mid-stream becomes an error object."""
    try:
        async with chunks.admitted():
            async for d in chunks.deltas():
                yield chunks.chunk(d)
        usage = chunks.usage_chunk()
        if usage is not None:
            yield usage
    except APIError as e:
        yield e.body()


def add_websocket_route(app: FastAPI, state: ServerState) -> None:
    @app.websocket("/v1/chat/completions/ws")
    async def chat_ws(ws: WebSocket):
        """One JSON chat request in; its stream chunks out as JSON messages, then "[DONE]"."""
        await ws.accept()
        try:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
            try:
                body = ChatCompletionRequest.model_validate_json(raw)
                service, lora = await state.ready_with_adapter(body.model, body.keep_alive)
                service.check_rate(client_key(state, ws))
                ticket = service.reserve()
            except ValidationError as e:
                message, param = validation_message(e)
                await ws.send_json(error_body(400, message, param, "invalid_value"))
                return await ws.close()
            except APIError as e:
                await ws.send_json(e.body())
                return await ws.close()
            try:
                await stream_over_websocket(ws, service, body, lora)
            finally:
                ticket.release()
        except WebSocketDisconnect:
            pass


async def stream_over_websocket(ws: WebSocket, service: Service, body: ChatCompletionRequest, lora: str | None) -> None:
    try:
        plan = await asyncio.to_thread(chat_plan, body, service.model, service.limits)
    except APIError as e:
        await ws.send_json(e.body())
        return await ws.close()
    plan.lora = lora
    chunks = Chunker(service, f"chatcmpl-{uuid.uuid4().hex}", body, [plan], chat=True)
    async with aclosing(stream_chunks(service, chunks)) as items:
        async for item in items:
            await ws.send_json(item)
    await ws.send_text("[DONE]")
    await ws.close()


def drop_422_from_openapi(app: FastAPI) -> None:
    """Validation failures are 400 here, never 422: keep the published schema honest."""
    build = app.openapi

    def openapi():
        schema = build()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        return schema

    app.openapi = openapi
