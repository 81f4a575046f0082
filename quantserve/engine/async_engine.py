"""The engine behind an asyncio interface: generate() streams token ids, abort() stops.

One worker thread owns the Engine (which is not thread-safe) and loops: take new commands
(add / abort / call: a LoRA adapter added or removed, a session's pin released) → step → hand each request's new tokens to
its asyncio queue. Callers never touch the Engine. Cancelling a generate() iterator (a client
that disconnects) aborts its request, and its KV blocks return to the pool at once. If a step
raises, the requests of that step fail with the error and the engine carries on with the others.

If the worker itself dies (an error escapes the loop), or a watchdog abandons it because a step
hangs, the engine is dead: every request it held fails with EngineFailed, and so does any added
later. A hung step cannot be interrupted; its thread keeps the engine (weights, KV cache) until
the step returns, then ends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from quantserve.config import SamplingParams
from quantserve.engine.engine import Engine, EngineStats, RequestError
from quantserve.engine.request import FinishReason, Pooling, Request, TokenLogprobs

logger = logging.getLogger("quantserve.engine")


class EngineFailed(RuntimeError):
    """The engine's worker died or was abandoned; the requests it held cannot finish."""


@dataclass
class TokenEvent:
    token_ids: list[int]                 # new since the previous event
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None    # one per new token, when the request asked
    queue_time: float | None = None                # seconds from arrival to first schedule (first event)
    embedding: list[float] | None = None           # a pooling request's vector (or [score]), when finished


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    sent: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, _Stream] = {}
        self.step_started: float | None = None     # monotonic time of the step running now, if any
        self.failure: str | None = None            # why the engine is dead, once it is
        self.lock = threading.Lock()               # streams: the worker's publishing vs _die
        self.worker = threading.Thread(target=self._loop, name="quantserve-engine", daemon=True)
        self.running = True
        self.worker.start()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       pin_owner: str | None = None, lora: str | None = None) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; RequestError if the engine rejects it. With `pin_owner`
        its KV blocks stay pinned for that owner when it ends, until unpin(owner); with `lora`, it
        runs with that loaded adapter."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._put(("add", request_id, prompt_ids, params, stream, None, pin_owner, lora))
        finished = False
        try:
            while not finished:
                event = await stream.events.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    async def embed(self, request_id: str, prompt_ids: list[int], pooling: Pooling) -> TokenEvent:
        """Read the prompt through the model, batched with whatever else runs; the finished
        event carries the pooled vector. RequestError if the engine rejects it."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._put(("add", request_id, prompt_ids, SamplingParams(max_new_tokens=1), stream, pooling, None, None))
        try:
            event = await stream.events.get()
        except BaseException:
            self.abort(request_id)
            raise
        if isinstance(event, BaseException):
            raise event
        return event

    async def add_lora(self, name: str, path: str) -> None:
        """Serve a LoRA adapter as `name`: read and checked off the worker (disk), then added between
        two steps. models/lora.py's LoRAError says why it cannot be."""
        adapter = await asyncio.to_thread(self.engine.read_lora, path)
        await asyncio.wrap_future(self.call(lambda engine: engine.install_lora(name, adapter)))

    async def remove_lora(self, name: str) -> None:
        await asyncio.wrap_future(self.call(lambda engine: engine.remove_lora(name)))

    def call(self, fn) -> concurrent.futures.Future:
        """fn(engine) on the worker, between two steps (the Engine is not thread-safe); its result or
        error in the future (EngineFailed once the engine is dead)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", fn, future))
        return future

    def _put(self, command: tuple) -> None:
        self.commands.put(command)
        if self.failure is not None:        # dead before or while this was queued: nobody will take it
            self._die(self.failure)

    @property
    def alive(self) -> bool:
        return self.failure is None and self.worker.is_alive()

    def abandon(self, reason: str) -> None:
        """Give up on a worker stuck in a step (from another thread): fail its requests now; the
        thread ends by itself if the step ever returns."""
        self.running = False
        self._die(reason)

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def unpin(self, owner: str) -> None:
        """Release the owner's pinned blocks, after every command sent before (an abort's pin too)."""
        self.call(lambda engine: engine.unpin(owner))

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (read from the worker's state without locking)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self.running = False
        self.commands.put(("wake",))
        self.worker.join(timeout=10)
        if not self.worker.is_alive():      # a request sent from now on fails rather than wait for nobody
            self._die("the engine was shut down")

    # ---- worker thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self.running:
                self._take_commands(block=not self.engine.has_work)
                if self.engine.has_work:
                    self._step()
        except BaseException as e:          # the worker ends: fail what it held rather than leave it waiting
            logger.error("the engine worker died", exc_info=True)
            self._die(f"the engine worker died: {e!r}")
            return
        self._fail_all(RuntimeError("the engine stopped"))

    def _die(self, reason: str) -> None:
        """Fail every request held or queued with EngineFailed(reason), without touching the Engine
        (its state is unknown); later adds fail too (see _put)."""
        with self.lock:
            self.failure = self.failure or reason
            error = EngineFailed(self.failure)
            for stream in self.streams.values():
                self._send(stream, error)
            self.streams.clear()
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    return
                if command[0] == "add":
                    self._send(command[4], error)
                elif command[0] == "call":
                    command[2].set_exception(error)

    def _take_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, ids, params, stream, pooling, pin_owner, lora = command
            try:
                self.engine.add_request(rid, ids, params, pooling, pin_owner, lora)
                with self.lock:
                    if self.failure is None:
                        self.streams[rid] = stream
                    else:
                        self._send(stream, EngineFailed(self.failure))
            except RequestError as e:
                self._fail(stream, e)
        elif command[0] == "abort":
            rid = command[1]
            self.engine.abort(rid)
            stream = self.streams.pop(rid, None)
            if stream is not None:
                self._send(stream, TokenEvent([], 0, 0, 0, FinishReason.ABORT.value))
        elif command[0] == "call":
            _, fn, future = command
            try:
                future.set_result(fn(self.engine))
            except Exception as e:        # the caller's error (a bad adapter), not the engine's
                future.set_exception(e)

    def _step(self) -> None:
        self.step_started = time.monotonic()
        try:
            changed = self.engine.step()
        except Exception as e:            # a fault fails the requests it touched, not the engine
            self._fail_running(e)
            return
        finally:
            self.step_started = None
        with self.lock:                   # an abandoned engine's late step publishes nothing (streams cleared)
            for request in changed:
                stream = self.streams.get(request.request_id)
                if stream is not None:
                    self._publish(request, stream)

    def _publish(self, r: Request, stream: _Stream) -> None:
        first, stream.sent = stream.sent, len(r.output_token_ids)
        reason = r.finish_reason.value if r.is_finished else None
        if reason is not None:
            self.streams.pop(r.request_id, None)
        logprobs = r.output_logprobs[first:stream.sent] if r.params.logprobs is not None else None
        queued = r.first_scheduled_time - r.arrival_time if first == 0 and r.first_scheduled_time else None
        self._send(stream, TokenEvent(r.output_token_ids[first:stream.sent], len(r.prompt_token_ids),
                                      len(r.output_token_ids), r.num_cached_tokens, reason, logprobs, queued,
                                      r.embedding))

    def _fail_running(self, error: Exception) -> None:
        """Fail the step's requests: the running ones, and any that finished inside the failed
        step before their tokens were published."""
        running = {r.request_id for r in self.engine.scheduler.running}
        with self.lock:
            for rid in [rid for rid in self.streams if rid in running or rid not in self.engine.requests]:
                self.engine.abort(rid)
                self._fail(self.streams.pop(rid), RuntimeError(f"engine step failed: {error}"))

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.streams):
            self.engine.abort(rid)
            self._fail(self.streams.pop(rid), error)

    def _fail(self, stream: _Stream, error: Exception) -> None:
        self._send(stream, error)

    @staticmethod
    def _send(stream: _Stream, item: TokenEvent | Exception) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, item)
        except RuntimeError:        # the caller's event loop is closed: nobody is listening
            pass
