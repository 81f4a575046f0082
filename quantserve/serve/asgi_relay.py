"""HTTP requests carried as ASGI messages between processes (Ray Serve's ingress and replicas).

The replica side runs a request through an ASGI app and yields the app's response messages;
the ingress side turns them back into a response, holding the request's fate open until the
first byte of the body: before that, a lost replica means the request can be sent again.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import Response, StreamingResponse

from quantserve.serve.errors import error_body, error_response

SCOPE_KEYS = ("method", "path", "raw_path", "query_string", "headers", "http_version", "scheme", "client", "server")


def portable_scope(scope: dict) -> dict:
    """The parts of an HTTP scope another process needs (no app, router or state objects)."""
    return {**{k: scope[k] for k in SCOPE_KEYS if k in scope}, "root_path": ""}


async def run_asgi(app, scope: dict, body: bytes) -> AsyncIterator[dict]:
    """The app's response messages for one request; stopping early tells the app the client left."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.create_task(app({**scope, "type": "http", "asgi": {"version": "3.0"}}, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                break
        await task                                # re-raise a crash of the app itself
    finally:
        gone.set()                                # the client went away: the app aborts the request
        if not task.done():
            await asyncio.wait({task}, timeout=5)


async def first_messages(answer) -> tuple[dict, list[dict]]:
    """The response start and the body messages up to the first non-empty one (or the end)."""
    start = await answer.__anext__()
    first = []
    async for message in answer:
        first.append(message)
        if message.get("body") or not message.get("more_body"):
            break
    return start, first


def streamed(start: dict, first: list[dict], answer, attempts: int, lost: tuple = (),
             on_close: Callable[[], None] | None = None) -> Response:
    """The response: the messages already read, then the rest as they come. `on_close` runs if
    the client leaves before the end (it cancels the replica's work)."""
    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            for message in first:
                yield message.get("body", b"")
            if not (first and not first[-1].get("more_body")):
                async for message in answer:
                    yield message.get("body", b"")
            finished = True
        except lost as e:             # the replica died mid-answer: end with an error event
            finished = True
            error = error_body(502, f"the replica failed: {e}", None, "replica_failed")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            if not finished and on_close is not None:
                on_close()

    headers = {k.decode(): v.decode() for k, v in start.get("headers", []) if k.lower() != b"content-length"}
    headers["x-quantserve-attempts"] = str(attempts)         # > 1: retried after a replica was lost
    return StreamingResponse(body(), status_code=start["status"], headers=headers)


def unavailable(reason: str) -> Response:
    return error_response(503, f"no replica could take the request: {reason}", None, "replica_unavailable")


