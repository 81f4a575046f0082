"""`quantserve serve proxy`: one OpenAI endpoint in front of several api_servers (LMDeploy's proxy).

Nodes join with POST /nodes/add (an api_server started with --proxy-url does it itself) and
leave with POST /nodes/remove; GET /nodes/status shows them. Every `health_interval` seconds
each node's /v1/models is read: a node that answers is healthy and serves the models it lists;
one that does not is out of rotation until a later check succeeds.

A request goes to a healthy node serving its `model`, chosen by the routing strategy:
    random                 any of them
    min_expected_latency   fewest unfinished requests, weighted by the node's mean latency
    min_observed_latency   lowest moving average of its observed request latency
A request its node cannot take (connection refused or dropped before an answer, or a 503) is
sent to the next node, so stopping a node loses only the requests it had already started.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from quantserve.serve.errors import APIError, install_error_handlers
from quantserve.serve.middleware import APIKeyAuth, BodyLimit
from quantserve.serve.protocol import Strict

logger = logging.getLogger("quantserve.proxy")

STRATEGIES = ("random", "min_expected_latency", "min_observed_latency")
FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/detokenize")


@dataclass
class Node:
    url: str
    healthy: bool = False
    models: list[dict] = field(default_factory=list)      # the node's /v1/models cards
    unfinished: int = 0
    latency: float | None = None                         # moving average of request seconds
    served: int = 0

    def serves(self, model: str | None) -> bool:
        return model is None or any(card["id"] == model for card in self.models)

    def status(self) -> dict:
        return {"healthy": self.healthy, "models": [c["id"] for c in self.models], "unfinished": self.unfinished,
                "latency": self.latency, "served": self.served}

    def finished(self, seconds: float) -> None:
        self.unfinished -= 1
        self.served += 1
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds


class NodeTable:
    def __init__(self, strategy: str = "min_expected_latency"):
        self.strategy = strategy
        self.nodes: dict[str, Node] = {}

    def choose(self, model: str | None, exclude: set[str]) -> Node:
        """The node for a request: 503 when no node is healthy, 404 when none serves `model`."""
        healthy = [n for n in self.nodes.values() if n.healthy and n.url not in exclude]
        if not healthy:
            raise APIError(503, "no healthy node: every api_server behind this proxy is down or loading", None,
                           "no_node")
        candidates = [n for n in healthy if n.serves(model)]
        if not candidates:
            served = sorted({c["id"] for n in healthy for c in n.models})
            raise APIError(404, f"the model '{model}' does not exist; the nodes serve {served}", "model",
                           "model_not_found")
        if self.strategy == "random":
            return random.choice(candidates)
        if self.strategy == "min_observed_latency":
            return min(candidates, key=lambda n: (n.latency or 0.0, n.unfinished))
        known = [n.latency for n in candidates if n.latency is not None]
        typical = sum(known) / len(known) if known else 1.0
        return min(candidates, key=lambda n: (n.unfinished + 1) * (n.latency or typical))

    def models(self) -> list[dict]:
        cards: dict[str, dict] = {}
        for node in self.nodes.values():
            if node.healthy:
                for card in node.models:
                    cards.setdefault(card["id"], card)
        return list(cards.values())


class NodeRequest(Strict):
    url: str = Field(pattern=r"^https?://[^\s/]+(:\d+)?/?$", description="http(s)://host:port of an api_server")


class Proxy:
    def __init__(self, strategy: str = "min_expected_latency", health_interval: float = 5.0):
        self.table = NodeTable(strategy)
        self.health_interval = health_interval
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                      limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64))

    async def check(self, node: Node) -> None:
        timeout = max(1.0, min(5.0, self.health_interval))
        try:
            ok = (await self.http.get(node.url + "/health", timeout=timeout)).status_code == 200
            if ok:
                node.models = (await self.http.get(node.url + "/v1/models", timeout=timeout)).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            ok = False
        if ok != node.healthy:
            logger.warning("node %s is %s", node.url, "back" if ok else "down")
        node.healthy = ok

    async def watch(self) -> None:
        while True:
            await asyncio.gather(*(self.check(n) for n in list(self.table.nodes.values())))
            await asyncio.sleep(self.health_interval)

    async def forward(self, request: Request, path: str) -> Response:
        """Send the request to a node and relay the answer. Until the first byte of the answer
        is in hand the request can still move: to the next node if its node fails it."""
        body = await request.body()
        model, stream = request_model(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        tried: set[str] = set()
        while True:
            node = self.table.choose(model, tried)
            tried.add(node.url)
            node.unfinished += 1
            start, answer = time.monotonic(), None
            try:
                answer = await self.http.send(self.http.build_request("POST", node.url + path, content=body,
                                                                      headers=headers), stream=True)
                if answer.status_code == 503:          # loading, or its engine stopped
                    raise Unavailable(answer.status_code)
                chunks = answer.aiter_raw()
                first = await anext(chunks, b"") if stream else await answer.aread()
            except (httpx.TransportError, Unavailable) as e:
                node.unfinished -= 1
                node.healthy = isinstance(e, Unavailable) and node.healthy
                if answer is not None:
                    await answer.aclose()
                logger.warning("node %s did not answer a request (%r); trying another", node.url, e)
                continue
            if not stream:
                node.finished(time.monotonic() - start)
                return Response(first, answer.status_code, passed_headers(answer),
                                answer.headers.get("content-type", "application/json"))
            return relay(answer, first, chunks, node, start)


class Unavailable(Exception):
    pass


def request_model(body: bytes) -> tuple[str | None, bool]:
    """The body's `model` and `stream` (a body that is not JSON goes anywhere; its node says 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    model = data.get("model")
    return (model if isinstance(model, str) else None), data.get("stream") is True


def passed_headers(answer: httpx.Response) -> dict:
    return {k: v for k, v in answer.headers.items() if k.lower() in ("retry-after", "cache-control")}


def relay(answer: httpx.Response, first: bytes, rest, node: Node, start: float) -> Response:
    async def chunks():
        try:
            yield first
            async for chunk in rest:
                yield chunk
        except httpx.HTTPError as e:           # the node died mid-answer: end the stream with an error
            logger.warning("node %s failed mid-answer: %s", node.url, e)
            error = APIError(502, f"the node serving this request failed: {e}", None, "node_failed")
            yield f"data: {json.dumps(error.body())}\n\n".encode()
        finally:
            await answer.aclose()
            node.finished(time.monotonic() - start)

    return StreamingResponse(chunks(), status_code=answer.status_code, headers=passed_headers(answer),
                             media_type=answer.headers.get("content-type", "text/event-stream"))


def build_proxy_app(proxy: Proxy, api_keys: list[str] | None = None, nodes: list[str] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for url in nodes:
            proxy.table.nodes[url.rstrip("/")] = Node(url.rstrip("/"))
        watcher = asyncio.create_task(proxy.watch())
        yield
        watcher.cancel()
        await proxy.http.aclose()

    app = FastAPI(title="quantserve proxy", description="One OpenAI endpoint for several api_servers",
                  lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=64 * 1024 * 1024)
    app.add_middleware(APIKeyAuth, api_keys=api_keys or [])
    add_node_routes(app, proxy)
    for path in FORWARDED:
        app.add_api_route(path, forwarder(proxy, path), methods=["POST"], include_in_schema=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": proxy.table.models()}

    @app.get("/health")
    async def health():
        if not any(n.healthy for n in proxy.table.nodes.values()):
            raise APIError(503, "no healthy node", None, "no_node")
        return {"status": "ok"}
    return app


def forwarder(proxy: Proxy, path: str):
    async def route(request: Request):
        return await proxy.forward(request, path)
    route.__name__ = "forward_" + path.strip("/").replace("/", "_")
    return route


def add_node_routes(app: FastAPI, proxy: Proxy) -> None:
    @app.post("/nodes/add")
    async def add_node(body: NodeRequest):
        url = body.url.rstrip("/")
        node = proxy.table.nodes.setdefault(url, Node(url))
        await proxy.check(node)
        return {"url": url, **node.status()}

    @app.post("/nodes/remove")
    async def remove_node(body: NodeRequest):
        url = body.url.rstrip("/")
        if proxy.table.nodes.pop(url, None) is None:
            raise APIError(404, f"no node {url}", "url", "node_not_found")
        return {"url": url, "removed": True}

    @app.get("/nodes/status")
    async def nodes_status():
        return {url: node.status() for url, node in proxy.table.nodes.items()}


def run_proxy(host: str, port: int, strategy: str, health_interval: float, api_keys: list[str] | None,
              nodes: list[str], log_level: str = "WARNING") -> None:
    import sys

    import uvicorn

    app = build_proxy_app(Proxy(strategy, health_interval), api_keys, nodes)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"quantserve: proxy at http://{shown}:{port}/v1 ({strategy}); add api_servers with POST /nodes/add "
          f"or `serve api_server ... --proxy-url http://{shown}:{port}`", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)

