"""The gRPC API (quantserve.proto: Generate, Embed, Models), grpc.health.v1.Health and reflection,
served next to the HTTP API by the same process, in the same event loop.

A call becomes the pydantic body the HTTP route would have parsed, and goes through the same
plan.py / Service / embeddings.py, so limits, validation, admission, metrics and abort-on-cancel
are those of HTTP. APIError statuses map onto gRPC codes. The message and service classes are
generated from the shipped .proto at start-up (grpcio-tools): no generated code in the tree.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from quantserve.serve.embeddings import EmbeddingRequest, embed_body
from quantserve.serve.errors import APIError, validation_message
from quantserve.serve.middleware import bearer_matches
from quantserve.serve.openai_app import ServerState, plan_chunks
from quantserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from quantserve.serve.responses import UsageCounter
from quantserve.serve.service import ChoiceDelta

logger = logging.getLogger("quantserve.serve")

PROTO = "quantserve/serve/quantserve.proto"          # relative to the directory holding the package
SERVICE = "quantserve.v1.Quantserve"
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
HEALTH_POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 5.0
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
         429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def load_protos():
    """(messages, services) modules of the shipped .proto, generated on first use (then cached
    in sys.modules). The package's parent directory is put on sys.path for protoc while it runs:
    an editable install is found by an import hook, not by a sys.path entry."""
    root = str(Path(__file__).resolve().parents[2])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        return grpc.protos_and_services(PROTO)
    finally:
        if added:
            sys.path.remove(root)


def status_code(error: APIError) -> grpc.StatusCode:
    if error.code == "model_not_supported":       # the model exists but cannot do this (embed, generate)
        return grpc.StatusCode.FAILED_PRECONDITION
    return CODES.get(error.status, grpc.StatusCode.INTERNAL)


def generation_body(request, model: str) -> tuple[ChatCompletionRequest | CompletionRequest, bool]:
    """A GenerateRequest as the chat (messages) or completions (prompt, token_ids) body HTTP parses,
    so pydantic checks every field the same way; unset fields keep the server's defaults."""
    given = [request.HasField("prompt"), bool(request.messages), bool(request.token_ids)]
    if sum(given) != 1:
        raise APIError(400, "give exactly one of prompt, messages and token_ids", "prompt", "invalid_value")
    fields = {"model": model, "stop": list(request.stop) or None, "ignore_eos": request.ignore_eos,
              "max_tokens": None}                 # completions' own default is 16; here it is the server's
    fields |= {name: getattr(request, name) for name in SAMPLING if request.HasField(name)}
    if request.messages:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.HasField("enable_thinking"):
            fields["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
        return ChatCompletionRequest.model_validate({**fields, "messages": messages}), True
    if request.HasField("enable_thinking"):
        raise APIError(400, "enable_thinking goes with messages (the chat template reads it)", "enable_thinking",
                       "invalid_value")
    prompt = request.prompt if request.HasField("prompt") else list(request.token_ids)
    return CompletionRequest.model_validate({**fields, "prompt": prompt}), False


class QuantserveServicer:
    """quantserve.v1.Quantserve on a ServerState (the HTTP server's models and metrics)."""

    def __init__(self, state: ServerState, protos):
        self.state, self.pb = state, protos
        cfg = state.config
        self.keys = [k.encode() for k in [*cfg.api_keys, *cfg.admin_api_keys]] if cfg.api_keys else []

    async def Generate(self, request, context) -> None:
        async with self.guarded(context):
            model = request.model or self.state.models.default
            service, lora = await self.admit(request.model, context)
            body, chat = generation_body(request, model)
            ticket = service.reserve()
            try:
                chunks = await plan_chunks(service, body, chat, "generate-", lora)
                # a cancelled call raises CancelledError here, which aborts the engine request
                async with chunks.admitted(), aclosing(chunks.deltas()) as deltas:
                    async for d in deltas:
                        await context.write(self.response(d, chunks.usage))
            finally:
                ticket.release()

    async def Embed(self, request, context):
        async with self.guarded(context):
            service, lora = await self.admit(request.model, context)
            if lora is not None:
                raise APIError(400, f"'{request.model}' is a LoRA adapter: embeddings come from models",
                               "model", "model_not_supported")
            if request.texts and request.token_ids:
                raise APIError(400, "give texts or token_ids, not both", "texts", "invalid_value")
            body = EmbeddingRequest(model=request.model or None,
                                    input=list(request.texts) or [list(t.ids) for t in request.token_ids],
                                    dimensions=request.dimensions if request.HasField("dimensions") else None)
            vectors, tokens = await embed_body(service, body)
            return self.pb.EmbedResponse(model=request.model or self.state.models.default, prompt_tokens=tokens,
                                         embeddings=[self.pb.Embedding(values=v) for v in vectors])

    async def Models(self, request, context):
        async with self.guarded(context):
            cards = self.state.models.cards()
            if not cards:
                self.state.check_health()
            names = [f.name for f in self.pb.ModelCard.DESCRIPTOR.fields]
            return self.pb.ModelsResponse(models=[self.pb.ModelCard(**{k: c[k] for k in names if k in c})
                                                  for c in cards])

    def response(self, d: ChoiceDelta, usage: UsageCounter):
        message = self.pb.GenerateResponse(text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason or "",
                                           reasoning=d.reasoning)
        if d.finish_reason:            # the counter has already added this last delta
            message.usage.CopyFrom(self.pb.Usage(prompt_tokens=usage.prompt, cached_tokens=usage.cached,
                                                 completion_tokens=sum(usage.completion.values())))
        return message

    async def admit(self, model: str, context) -> tuple:
        """The model's Service (a LoRA adapter's: its base model's, and the adapter's name), once the
        caller's rate allows it: per key, or per address (as HTTP)."""
        service, lora = await self.state.ready_with_adapter(model or None)
        service.check_rate(self.api_key(context) if self.keys else context.peer().rpartition(":")[0])
        return service, lora

    def authorize(self, context) -> None:
        token = self.api_key(context).encode()
        if self.keys and not bearer_matches(b"Bearer " + token, self.keys):     # its constant-time comparison
            raise APIError(401, "invalid or missing API key (send metadata 'authorization: Bearer <key>' "
                           "or 'x-api-key: <key>')", None, "invalid_api_key")

    @staticmethod
    def api_key(context) -> str:
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else metadata.get("x-api-key", "")

    @asynccontextmanager
    async def guarded(self, context):
        """Errors as status codes with their message; the server goes on serving."""
        try:
            self.authorize(context)
            yield
        except APIError as e:
            retry = (e.headers or {}).get("Retry-After")          # 429s say when to come back, as over HTTP
            await context.abort(status_code(e), e.message, (("retry-after", retry),) if retry else ())
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, validation_message(e)[0])
        except Exception as e:
            logger.exception("unexpected error in a gRPC call")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


class Health(health_aio.HealthServicer):
    """grpc.health.v1.Health as /health: SERVING once every model is loaded and its engine alive,
    NOT_SERVING while one loads or after its engine stopped (overall and for the Quantserve service)."""

    def __init__(self, state: ServerState):
        super().__init__()
        self.state = state

    async def refresh(self) -> None:
        try:
            self.state.check_health()
            status = health_pb2.HealthCheckResponse.SERVING
        except APIError:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.set(name, status)

    async def Check(self, request, context):
        await self.refresh()               # exact for a Check; Watch sees the periodic refresh
        return await super().Check(request, context)

    async def poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(HEALTH_POLL_SECONDS)


def grpc_lifespan(state: ServerState):
    """The app's lifespan: the gRPC server runs from the app's start-up to its shutdown."""
    @asynccontextmanager
    async def lifespan(_app):
        server, health = build_server(state)
        await server.start()
        poll = asyncio.create_task(health.poll())
        try:
            yield
        finally:
            poll.cancel()
            await health.enter_graceful_shutdown()
            await server.stop(STOP_GRACE_SECONDS)
    return lifespan


def build_server(state: ServerState) -> tuple[grpc.aio.Server, Health]:
    cfg = state.config
    protos, services = load_protos()
    # the HTTP body limit for messages; no SO_REUSEPORT, so a port already taken fails the start-up
    # rather than sharing its calls with another server
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", cfg.limits.max_body_bytes),
                                      ("grpc.so_reuseport", 0)])
    services.add_QuantserveServicer_to_server(QuantserveServicer(state, protos), server)
    health = Health(state)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([SERVICE, health_name, reflection.SERVICE_NAME], server)
    server.add_insecure_port(grpc_address(cfg.grpc_host, cfg.grpc_port))
    return server, health


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
