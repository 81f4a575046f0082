"""`quantserve serve ray`: replicas of the api_server on Ray Serve, behind one OpenAI ingress.

    client ──HTTP──> Ray Serve proxy ──> Ingress ──DeploymentHandle──> EngineReplica × N
                                                   (least loaded)      (engine + the OpenAI app)

Each EngineReplica owns an engine and runs quantserve's whole OpenAI app in-process: a request
reaches it as its ASGI scope and body, and its answer returns as a stream of ASGI messages, so
validation, errors, streaming and metrics are exactly the api_server's. The Ingress forwards
every request through a DeploymentHandle (Ray Serve's router: power of two choices by queue
length). Until the replica has sent the first byte of the answer's body the request can be
retried on another replica: a replica that dies loses only the requests it had started to
answer. Ray Serve health-checks the replicas, replaces dead ones, and with autoscaling adds and
removes replicas by the number of requests each one holds.
"""

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from quantserve.serve.asgi_relay import first_messages, portable_scope, run_asgi, streamed, unavailable
from quantserve.serve.errors import error_response

logger = logging.getLogger("quantserve.ray")

REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaUnavailableError,
                DeploymentUnavailableError)
MAX_ATTEMPTS = 4


@dataclass
class ReplicaSpec:
    """What every replica loads and how it serves (picklable: sent to the replica processes)."""
    model_name: str
    model_path: str
    engine: dict = field(default_factory=dict)          # EngineConfig fields
    server: dict = field(default_factory=dict)          # ServerConfig fields other than limits
    limits: dict = field(default_factory=dict)          # Limits fields


@serve.deployment(health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class EngineReplica:
    def __init__(self, spec: ReplicaSpec):
        from quantserve.config import EngineConfig
        from quantserve.config import ServerConfig
        from quantserve.serve.openai_app import ServerState, build_app
        from quantserve.config import Limits
        from quantserve.serve.server import make_loader

        config = ServerConfig(spec.model_name, limits=Limits(**spec.limits), **spec.server)
        self.state = ServerState(config)
        self.state.models.loader = make_loader(EngineConfig(**spec.engine), config, self.state.metrics,
                                               progress=False)
        self.state.models.start([(spec.model_name, spec.model_path)]).join()
        self.state.check_health()                 # a failed load fails the replica's start
        self.app = build_app(self.state)

    async def handle(self, scope: dict, body: bytes) -> AsyncIterator[dict]:
        """Run one HTTP request through the OpenAI app; yield its ASGI response messages."""
        async for message in run_asgi(self.app, scope, body):
            yield message

    async def check_health(self) -> None:
        self.state.check_health()


ingress_app = FastAPI(title="quantserve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(health_check_period_s=2)
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, replicas):
        self.replicas = replicas.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def forward(self, request: Request, path: str) -> Response:
        scope, body = portable_scope(request.scope), await request.body()
        lost = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            answer = self.replicas.handle.remote(scope, body)
            try:
                start, first = await first_messages(answer)
            except BackPressureError:
                return error_response(429, "every replica is busy and the queue is full; retry shortly", None,
                                      "overloaded", {"Retry-After": "1"})
            except REPLICA_LOST as e:
                logger.warning("replica lost before answering (attempt %d): %s", attempt, e)
                lost = e
                continue
            return streamed(start, first, answer, attempt, REPLICA_LOST, on_close=answer.cancel)
        return unavailable(str(lost))


def build_application(spec: ReplicaSpec, num_replicas: int = 1, autoscale: tuple[int, int] | None = None,
                      cpus_per_replica: float = 1.0, max_ongoing_requests: int = 64, max_queued_requests: int = -1):
    """The Ray Serve application: `serve.run(build_application(spec, 2))` on any Ray cluster.
    Past max_queued_requests waiting in the router (-1: no limit) a request gets 429."""
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica}, "max_ongoing_requests": max_ongoing_requests,
               "max_queued_requests": max_queued_requests}
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": max(1, max_ongoing_requests // 2),
                                         "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = num_replicas
    replicas = EngineReplica.options(**options).bind(spec)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(replicas)


def run(spec: ReplicaSpec, host: str, port: int, address: str | None = None, **app_options) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until interrupted."""
    import sys
    import time

    import ray

    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, **app_options), name="quantserve", route_prefix="/")
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    print(f"quantserve: '{spec.model_name}' on Ray Serve at http://{shown}:{port}/v1 "
          f"(cluster: {address or 'local'}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
