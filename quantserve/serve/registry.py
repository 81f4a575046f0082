"""The models one server serves, by name: loaded at start-up or at run time, unloaded, hot-reloaded.

A request looks its model up once and keeps that Service to the end. Swapping a name to a new
Service (hot reload) or dropping the name (unload) therefore never touches a request already
admitted: the old Service drains (its count of admitted requests reaches zero) before its
engine stops. New requests see the new Service, or a 404 once the name is gone.

A watchdog (the app's lifespan runs it) restarts a model whose engine died, or whose step ran past
--step-timeout (that engine is abandoned: see AsyncEngine.abandon), with the same path and
settings; the requests the engine held have already failed with a 503 that says so, and the
model is 503 until the new engine serves.

LoRA adapters (vLLM's): each is served under its own name, which resolves to its base model's
Service plus the adapter. The registry remembers them, so an engine loaded again (restart,
keep-alive, reload) gets its model's adapters back; unloading a model drops its adapters.

Keep-alive (Ollama's): a model with no request for its keep-alive (--keep-alive, or the last
request's keep_alive) is unloaded: its engine stops and its weights and KV cache are freed, while
its name stays served ("unloaded" in /v1/models; /health stays 200). The next request loads it
again with the same settings and waits for that.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field

from quantserve.config import LoRAModule
from quantserve.models.lora import LoRAError
from quantserve.serve.errors import APIError
from quantserve.serve.service import Service

logger = logging.getLogger("quantserve.serve")

# (name, path, engine overrides) -> the model's Service and its /v1/models card
Loader = Callable[[str, str | None, dict], tuple[Service, dict]]


@dataclass
class ModelSlot:
    name: str
    path: str | None
    service: Service | None = None     # None while loading, or after a failed start-up load
    card: dict = field(default_factory=dict)
    error: str | None = None
    overrides: dict = field(default_factory=dict)     # engine settings it was loaded with (restarts reuse them)
    restarting: bool = False
    unloaded: bool = False                  # idle past its keep-alive: engine stopped, memory freed
    keep_alive: float | None = None         # seconds idle before unloading, from the last request (None: server's)
    last_used: float = field(default_factory=time.monotonic)
    waking: asyncio.Task | None = None      # its load after an idle unload, awaited by every request meanwhile

    @property
    def status(self) -> str:
        return "unloaded" if self.unloaded else "restarting" if self.restarting else "loaded"


@dataclass
class AdapterSlot:
    name: str
    base: str                               # the served model it adapts
    path: str
    created: int = field(default_factory=lambda: int(time.time()))


class ModelRegistry:
    def __init__(self, loader: Loader | None = None, drain_timeout: float = 600.0, keep_alive: float = math.inf):
        self.loader = loader
        self.keep_alive = keep_alive         # the server's --keep-alive, in seconds
        self.slots: dict[str, ModelSlot] = {}
        self.busy: set[str] = set()          # names with a load, unload or reload under way
        self.drain_timeout = drain_timeout
        self.tasks: set[asyncio.Task] = set()      # restarts and unloads under way (a reference keeps each alive)
        self.adapters: dict[str, AdapterSlot] = {}     # LoRA adapters by their served name

    # ---- lookup --------------------------------------------------------------------------------

    @property
    def default(self) -> str | None:
        return next(iter(self.slots), None)

    def get(self, name: str | None = None) -> Service:
        """The Service for `name` (None: the first model); 404 for a name not served, 503 while
        it loads, after its load failed, or once its engine has stopped."""
        slot = self.slots.get(name if name is not None else self.default)
        if slot is None:
            served = ", ".join(f"'{n}'" for n in [*self.slots, *self.adapters]) or "no model"
            if name is None:
                raise APIError(503, "no model is loaded", None, "not_ready")
            raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                           "model", "model_not_found")
        if slot.unloaded:                   # acquire() loads it; only a bare lookup gets here
            raise APIError(503, f"the model '{slot.name}' is unloaded until its next request", None, "unloaded")
        # a dead engine is restarting, or about to be within a watchdog round
        if slot.restarting or (slot.service is not None and not slot.service.engine.alive and self.loader):
            raise APIError(503, f"the engine of '{slot.name}' failed and is restarting; retry shortly", None,
                           "engine_restarting")
        if slot.service is None:
            raise APIError(503, slot.error or f"the model '{slot.name}' is still loading", None, "not_ready")
        if not slot.service.engine.alive:
            raise APIError(503, f"the engine of '{slot.name}' has stopped", None, "engine_dead")
        return slot.service

    def check(self) -> None:
        """503 unless every model serves (one unloaded for idleness does: its next request loads it)."""
        if not self.slots:
            self.get()
        for name in [n for n, slot in self.slots.items() if not slot.unloaded]:
            self.get(name)

    async def acquire(self, name: str | None = None, keep_alive: float | None = None) -> Service:
        """get(), once the model is loaded again if it was unloaded for idleness (the request waits);
        the request sets the model's keep-alive (None: the server's) and counts as its use."""
        slot = self.slots.get(name if name is not None else self.default)
        if slot is not None and slot.unloaded and self.loader is not None:
            if slot.waking is None:
                slot.waking = asyncio.create_task(self._wake(slot))
            await asyncio.shield(slot.waking)           # one request gone does not stop the load for the others
        service = self.get(name)
        slot.keep_alive, slot.last_used = keep_alive, time.monotonic()
        return service

    def resolve(self, name: str | None) -> tuple[str | None, str | None]:
        """A requested model name -> (the model that runs it, the LoRA adapter it runs with or None)."""
        adapter = self.adapters.get(name) if name is not None else None
        return (adapter.base, adapter.name) if adapter is not None else (name, None)

    def cards(self) -> list[dict]:
        """Every served model's card, then every adapter's (vLLM's: `parent` its model, `root` its path)."""
        cards = [{**s.card, "status": s.status} for s in self.slots.values() if s.service is not None or s.unloaded]
        bases = {c["id"]: c for c in cards}
        return cards + [{"id": a.name, "object": "model", "created": a.created, "owned_by": "quantserve",
                         "root": a.path, "parent": a.base, "max_model_len": bases[a.base]["max_model_len"],
                         "capabilities": ["chat", "completions"], "status": bases[a.base]["status"]}
                        for a in self.adapters.values() if a.base in bases]

    def add(self, name: str, service: Service, card: dict, path: str | None = None) -> None:
        self.slots[name] = ModelSlot(name, path, service, card)

    # ---- start-up ------------------------------------------------------------------------------

    def start(self, models: list[tuple[str, str | None]], on_error: Callable[[Exception], None] | None = None,
              loras: list[LoRAModule] = ()) -> threading.Thread:
        """Load the start-up models one after the other in a thread, each with its adapters among
        `loras` (a LoRA module without a base adapts the first model); each is 503 until loaded."""
        for name, path in models:
            self.slots[name] = ModelSlot(name, path)
        for m in loras:
            self.adapters[m.name] = AdapterSlot(m.name, m.base_model_name or models[0][0], m.path)

        def run():
            for name, path in models:
                slot = self.slots[name]
                try:
                    slot.service, slot.card = self._serve(name, path, {}, strict=True)
                except Exception as e:          # reported by /health and by the model's routes
                    slot.error = f"loading the model '{name}' failed: {e}"
                    if on_error is not None:
                        on_error(e)
        thread = threading.Thread(target=run, name="quantserve-load", daemon=True)
        thread.start()
        return thread

    # ---- run time ------------------------------------------------------------------------------

    async def load(self, name: str, path: str | None, overrides: dict) -> dict:
        """Load a new model under `name`; its card once it serves."""
        self._claim(name, must_exist=False)
        try:
            service, card = await asyncio.to_thread(self._load, name, path, overrides)
            self.slots[name] = ModelSlot(name, path, service, card, overrides=overrides)
            return card
        finally:
            self.busy.discard(name)

    async def unload(self, name: str) -> None:
        """Stop serving `name` at once; its engine stops when its admitted requests have finished."""
        self._claim(name, must_exist=True)
        try:
            slot = self.slots.pop(name)
            self.adapters = {n: a for n, a in self.adapters.items() if a.base != name}
            if slot.service is not None:
                await self._retire(slot.service)
        finally:
            self.busy.discard(name)

    async def reload(self, name: str, path: str | None, overrides: dict) -> dict:
        """Replace `name`'s weights (from `path`, default: where they came from) with no downtime:
        the new engine loads while the old one serves, then takes the new requests."""
        self._claim(name, must_exist=True)
        try:
            slot = self.slots[name]
            path = path or slot.path
            service, card = await asyncio.to_thread(self._load, name, path, overrides)
            old = slot.service
            slot.service, slot.card, slot.path, slot.error, slot.overrides = service, card, path, None, overrides
            slot.unloaded = False
            if old is not None:
                await self._retire(old)
            return card
        finally:
            self.busy.discard(name)

    def _claim(self, name: str, must_exist: bool) -> None:
        if name in self.busy:
            raise APIError(409, f"the model '{name}' is already being loaded, unloaded or reloaded", "model",
                           "model_busy")
        if must_exist and name not in self.slots:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        if not must_exist and (name in self.slots or name in self.adapters):
            raise APIError(409, f"a model named '{name}' is already served; unload it or reload it", "model",
                           "model_exists")
        if self.loader is None and not must_exist:
            raise APIError(400, "this server cannot load models", None, "not_supported")
        self.busy.add(name)

    def _load(self, name: str, path: str | None, overrides: dict) -> tuple[Service, dict]:
        try:
            return self._serve(name, path, overrides)
        except APIError:
            raise
        except Exception as e:                  # a bad path, a bad checkpoint, not enough memory
            raise APIError(400, f"loading the model '{name}' failed: {e}", "path", "load_failed") from e

    def _serve(self, name: str, path: str | None, overrides: dict, strict: bool = False) -> tuple[Service, dict]:
        """The loader's Service, with the model's LoRA adapters added to its new engine. An adapter
        that no longer loads (its directory changed, a lower limit) fails the start-up (`strict`);
        later (a restart, a wake, a reload) it is dropped with an error logged, and the model serves."""
        service, card = self.loader(name, path, overrides)
        try:
            for a in [a for a in self.adapters.values() if a.base == name]:
                try:
                    if not service.model.generates:
                        raise LoRAError(f"'{name}' only embeds and scores")
                    service.engine.call(lambda engine, a=a: engine.add_lora(a.name, a.path)).result()
                except LoRAError as e:
                    if strict:
                        raise LoRAError(f"the LoRA adapter '{a.name}' ({a.path}): {e}") from None
                    logger.error("the LoRA adapter '%s' (%s) is no longer served: %s", a.name, a.path, e)
                    self.adapters.pop(a.name, None)
        except BaseException:
            service.engine.shutdown()
            raise
        return service, card

    # ---- LoRA adapters -------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str, base: str | None = None) -> dict:
        """Serve a LoRA adapter of `base` (default: the first model) under `name`; its card. 400 with
        the reason when it cannot be (a bad directory, shapes, rank, or --max-loras reached)."""
        base = base or self.default
        if name in self.slots or name in self.adapters or name in self.busy:
            raise APIError(400, f"'{name}' is already served (a model or a LoRA adapter)", "lora_name",
                           "invalid_value")
        if base in self.busy:
            raise APIError(409, f"the model '{base}' is being loaded, unloaded or reloaded", "base_model_name",
                           "model_busy")
        service = await self.acquire(base)
        if not service.model.generates:
            raise APIError(400, f"the model '{base}' only embeds and scores: LoRA adapters need a model that "
                                "generates", "base_model_name", "model_not_supported")
        self.busy.add(name)
        slot = self.adapters[name] = AdapterSlot(name, base, path)    # first: an engine built meanwhile adds it too
        try:
            await service.engine.add_lora(name, path)
        except LoRAError as e:
            self.adapters.pop(name, None)
            raise APIError(400, f"loading the LoRA adapter '{name}' failed: {e}", "lora_path", "invalid_value") from e
        finally:
            self.busy.discard(name)
        self.adapters[name] = slot
        return next(c for c in self.cards() if c["id"] == name)

    async def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter; requests already running with it finish with it."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise APIError(404, f"no LoRA adapter named '{name}' is loaded", "lora_name", "model_not_found")
        slot = self.slots.get(adapter.base)
        if slot is not None and slot.service is not None and slot.service.engine.alive:
            try:
                await slot.service.engine.remove_lora(name)
            except LoRAError:            # its engine never had it (a restart under way): nothing to remove
                pass

    async def _retire(self, service: Service) -> None:
        """Wait for the admitted requests to finish, then stop the engine and forget its gauges."""
        deadline = time.monotonic() + self.drain_timeout
        while service.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if service.active:
            logger.warning("stopping '%s' with %d requests still running", service.metrics.model_name,
                           service.active)
        await asyncio.to_thread(service.engine.shutdown)
        if service.metrics.model_name not in self.slots:          # unloaded, not replaced
            service.metrics.hub.forget_engine(service.metrics.model_name)

    # ---- self-healing --------------------------------------------------------------------------

    def lifespan(self, step_timeout: float | None, inner=None):
        """An app lifespan: the watchdog runs from start-up to shutdown, around `inner` (another one)."""
        @asynccontextmanager
        async def run(app):
            watchdog = asyncio.create_task(self.watch(step_timeout))
            try:
                async with inner(app) if inner is not None else nullcontext():
                    yield
            finally:
                watchdog.cancel()
        return run

    async def watch(self, step_timeout: float | None, interval: float = 0.25) -> None:
        """Restart every model whose engine has died (abandoning first one whose step hangs), and
        unload every model idle past its keep-alive."""
        while True:
            await asyncio.sleep(interval)
            for slot in list(self.slots.values()):
                if slot.service is not None and slot.name not in self.busy and self.loader is not None:
                    try:
                        self._check(slot, step_timeout)
                    except Exception:           # the watchdog must outlive any one model's trouble
                        logger.exception("checking the model '%s' failed", slot.name)

    def _check(self, slot: ModelSlot, step_timeout: float | None) -> None:
        """One model's round (a function of its own: no local keeps an unloaded engine alive)."""
        engine = slot.service.engine
        started = engine.step_started
        if step_timeout and started is not None and time.monotonic() - started > step_timeout:
            engine.abandon(f"an engine step ran longer than the step timeout ({step_timeout:g} s)")
        if not engine.alive:
            slot.restarting = True          # 503 from now, and no second restart
            self.busy.add(slot.name)
            self._spawn(self._restart(slot))
        elif self._idle(slot):
            self._unload_idle(slot)

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _restart(self, slot: ModelSlot) -> None:
        """Load the model again as it was loaded; the old engine is dropped, not shut down: its
        worker is gone, or stuck in a step it will leave only when that step returns."""
        old = slot.service
        logger.error("the engine of '%s' failed (%s); restarting it", slot.name, old.engine.failure)
        old.metrics.restarted()
        try:
            slot.service, slot.card = await asyncio.to_thread(self._serve, slot.name, slot.path, slot.overrides)
            slot.error = None
        except Exception as e:              # the model stays 503 with the reason
            slot.service, slot.error = None, f"restarting the model '{slot.name}' failed: {e}"
            logger.error("%s", slot.error)
        finally:
            slot.restarting = False
            self.busy.discard(slot.name)

    # ---- keep-alive ----------------------------------------------------------------------------

    def _idle(self, slot: ModelSlot) -> bool:
        """Idle past its keep-alive; a model with requests admitted or in its engine, or KV blocks
        pinned by an open session (which also holds its Service), is in use now."""
        service, now = slot.service, time.monotonic()
        stats = service.engine.stats()
        if service.active or stats.num_running or stats.num_waiting or stats.num_pinned_blocks:
            slot.last_used = now
            return False
        return now - slot.last_used >= (self.keep_alive if slot.keep_alive is None else slot.keep_alive)

    def _unload_idle(self, slot: ModelSlot) -> None:
        """Take the model out of service now (a request from here on waits for its load), then stop
        its engine and drop every reference to it (its gauges' too), so its memory is freed."""
        service, slot.service, slot.unloaded = slot.service, None, True
        logger.info("unloading '%s': idle for its keep-alive", slot.name)
        self.busy.add(slot.name)            # until its engine has stopped: a load waits for the memory
        service.metrics.hub.forget_engine(slot.name)
        engine = service.engine

        async def stop():
            try:
                await asyncio.to_thread(engine.shutdown)
            finally:
                self.busy.discard(slot.name)
        self._spawn(stop())

    async def _wake(self, slot: ModelSlot) -> None:
        """Load an idle-unloaded model again, as it was loaded (after its engine has stopped)."""
        while slot.name in self.busy:           # its unload still stopping the engine, or an admin change
            await asyncio.sleep(0.05)
        if self.slots.get(slot.name) is not slot or not slot.unloaded:     # unloaded by an admin, or reloaded
            slot.waking = None
            return
        self.busy.add(slot.name)
        try:
            slot.service, slot.card = await asyncio.to_thread(self._serve, slot.name, slot.path, slot.overrides)
            slot.unloaded = False
        except Exception as e:
            raise APIError(503, f"loading the model '{slot.name}' again failed: {e}", None, "load_failed") from e
        finally:
            slot.waking = None
            self.busy.discard(slot.name)
