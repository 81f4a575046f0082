"""ASGI middleware: request body size and time limits (413, 408) and API-key authentication (401).

All answer in the error shape of the API the path belongs to (OpenAI's, or Anthropic's on
/v1/messages). A key comes as `Authorization: Bearer <key>` or, as Anthropic's clients send it,
`x-api-key: <key>`; keys are compared in constant time against every configured key; /health,
/metrics and the docs stay open.
"""
from __future__ import annotations

import asyncio
import hmac
import json

CLOSE = {"Connection": "close"}     # the client may still be sending: do not wait to read the rest
OPEN_PATHS = {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/"}


async def send_error(send, status: int, message: str, code: str, headers: dict | None = None,
                     path: str | None = None) -> None:
    from quantserve.serve.errors import shaped_error_body

    status, shaped = shaped_error_body(path, status, message, None, code)
    body = json.dumps(shaped).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, whether or not Content-Length is sent; with
    `timeout`, read the whole body first and refuse one that takes longer than that many seconds
    to arrive with 408 (uvicorn has no such deadline: a body trickled a byte a second would hold
    its connection and its handler for as long as the client likes)."""

    def __init__(self, app, max_bytes: int, timeout: float | None = None):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.too_large(send, scope["path"])
        if length is not None and self.timeout is None:
            return await self.app(scope, receive, send)
        try:
            messages = await self.read_body(receive)
        except BodyTooLarge:
            return await self.too_large(send, scope["path"])
        except asyncio.TimeoutError:
            return await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                                    "request_timeout", CLOSE, scope["path"])

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def read_body(self, receive) -> list[dict]:
        """The body's messages, read within the deadline and the size limit."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        messages, size = [], 0
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            message = await asyncio.wait_for(receive(), left)
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise BodyTooLarge
            if message["type"] != "http.request" or not message.get("more_body"):
                return messages

    async def too_large(self, send, path: str) -> None:
        await send_error(send, 413, f"the request body is larger than {self.max_bytes} bytes", "body_too_large", CLOSE,
                         path)


class APIKeyAuth:
    """With API keys configured, every route but the open ones needs one of them (or an admin key)."""

    def __init__(self, app, api_keys: list[str], admin_keys: list[str] = ()):
        self.app = app
        self.keys = [k.encode() for k in [*api_keys, *admin_keys]] if api_keys else []

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or not self.keys:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        key = self.matching_key(dict(scope["headers"]))
        if key is not None:
            scope.setdefault("state", {})["api_key"] = key      # the rate limit counts per key
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
        await send_error(send, 401, "invalid or missing API key (send 'Authorization: Bearer <key>' or "
                         "'x-api-key: <key>')", "invalid_api_key", {"WWW-Authenticate": "Bearer"}, scope["path"])

    def matching_key(self, headers: dict[bytes, bytes]) -> str | None:
        """The configured key the request carries (either header), or None."""
        bearer, api_key = headers.get(b"authorization", b""), headers.get(b"x-api-key")
        if bearer_matches(bearer, self.keys):
            return bearer.partition(b" ")[2].strip().decode()
        if api_key is not None and bearer_matches(b"Bearer " + api_key, self.keys):
            return api_key.strip().decode()
        return None


def bearer_matches(header: bytes, keys: list[bytes]) -> bool:
    """`Bearer <key>` with one of `keys`, compared in constant time."""
    scheme, _, token = header.partition(b" ")
    ok = False
    for key in keys:          # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(token.strip(), key)
    return ok and scheme.lower() == b"bearer"
