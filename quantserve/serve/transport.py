"""The connection layer under the API: what a misbehaving client may cost the server.

uvicorn's h11 protocol, with what uvicorn leaves open closed:
- a fresh connection that never sends a byte is closed after `timeout_keep_alive`, as an idle
  keep-alive one is (uvicorn only arms that timer once a response has been sent);
- a request head must be complete within `timeout_request_read` of its first byte, or the client
  gets 408 and the connection is closed: trickled headers cannot hold a socket for ever (the
  body has the same deadline, kept by middleware.BodyGuard);
- a head over `max_header_size` bytes gets 431 before h11 parses it (h11's own limit, also set,
  only catches heads that are still incomplete);
- past `limit_concurrency` open connections, a request on a new one gets 503 and is closed;
- a connection answered before its body was read (401, 408, 413) is closed, not drained.
Every refusal is in the API's error shape.
"""
from __future__ import annotations

import functools
import http
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from quantserve.config import ConnectionLimits


def uvicorn_options(limits: ConnectionLimits) -> dict:
    """uvicorn.Config / uvicorn.run keywords that apply `limits` (the CLI and the tests share them)."""
    return dict(http=functools.partial(GuardedH11Protocol, limits=limits), timeout_keep_alive=limits.timeout_keep_alive,
                h11_max_incomplete_event_size=limits.max_header_size, limit_concurrency=limits.limit_concurrency)


def raw_error(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for answers given before
    (or instead of) a parsed request."""
    from quantserve.serve.errors import error_body

    body = json.dumps(error_body(status, message, None, code)).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


async def over_capacity(scope, receive, send) -> None:
    from quantserve.serve.middleware import send_error

    await send_error(send, 503, "the server has too many open connections; retry shortly", "too_many_connections",
                     {"Connection": "close", "Retry-After": "1"}, scope.get("path"))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and limits above."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.limit_concurrency = None     # counted in connection_made instead, to answer in the API's shape
        self.head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        limit = self.limits.limit_concurrency
        if len(self.connections) > limit or len(self.tasks) >= limit:
            self.app = over_capacity
        # uvicorn arms the idle timer only after a response: a client that never sends must time out too
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.head_too_large(data):
            self._unset_keepalive_if_required()
            return self.refuse(431, f"the request headers are larger than {self.limits.max_header_size} bytes",
                               "headers_too_large")
        super().data_received(data)
        self.watch_head()

    def head_too_large(self, data: bytes) -> bool:
        """Whether the head buffered so far is over the limit, ended or not."""
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n", 0, self.limits.max_header_size + 4)
        return end < 0 and len(buffered) > self.limits.max_header_size

    def watch_head(self) -> None:
        """Start the head's deadline at its first byte; stop it once the head is in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.head_timer is None:
            self.head_timer = self.loop.call_later(self.limits.timeout_request_read, self.head_timed_out)
        elif not waiting:
            self.cancel_head_timer()

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and self.transport.get_protocol() is self:
            self.refuse(408, f"the request headers did not arrive within {self.limits.timeout_request_read:g} s",
                        "request_timeout")

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # answered before the body was all read: waiting for the rest would let a trickle hold the socket
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed, or a head past h11's limit): say so in the API's shape."""
        if len(self.conn.trailing_data[0]) > self.limits.max_header_size:
            return self.refuse(431, f"the request headers are larger than {self.limits.max_header_size} bytes",
                               "headers_too_large")
        self.refuse(400, "invalid HTTP request", "invalid_http")

    def refuse(self, status: int, message: str, code: str) -> None:
        self.cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(raw_error(status, message, code))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)
