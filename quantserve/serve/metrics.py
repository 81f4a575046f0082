"""Prometheus metrics under vLLM's names, so existing vLLM dashboards work unchanged.

Latency histograms are observed as requests stream; engine gauges (running, waiting, KV usage)
and the prefix-cache and speculative-decoding counters are read from the engine when /metrics is
scraped.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class EngineCollector:
    """Gauges and counters that live in the engines, read at scrape time (one series per model)."""

    def __init__(self):
        self.sources: dict[str, Callable] = {}      # model name -> engine stats

    def collect(self):
        snapshots = [(name, stats()) for name, stats in list(self.sources.items())]
        snapshots = [(name, s) for name, s in snapshots if s is not None]
        gauges = [("vllm:num_requests_running", "Requests in the running batch", "num_running"),
                  ("vllm:num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
                  ("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", "kv_usage"),
                  ("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full; vLLM's older name)", "kv_usage"),
                  ("quantserve:kv_cache_blocks_total", "KV cache blocks", "num_blocks"),
                  ("quantserve:kv_cache_blocks_free", "Free KV cache blocks", "num_free_blocks"),
                  ("quantserve:kv_cache_blocks_pinned", "KV cache blocks pinned by open sessions", "num_pinned_blocks")]
        for name, doc, attr in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            for model, s in snapshots:
                g.add_metric([model], getattr(s, attr))
            yield g
        for name, doc, attr in [("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                 "prefix_queried_tokens"),
                                ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                 "prefix_hit_tokens"),
                                ("vllm:spec_decode_num_drafts", "Speculative drafts verified", "spec_num_drafts"),
                                ("vllm:spec_decode_num_draft_tokens", "Speculative tokens drafted",
                                 "spec_num_draft_tokens"),
                                ("vllm:spec_decode_num_accepted_tokens", "Speculative tokens accepted",
                                 "spec_num_accepted_tokens")]:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            for model, s in snapshots:
                c.add_metric([model], getattr(s, attr))
            yield c


class ServerMetrics:
    """The server's one registry; every series carries the model's name."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.engines = EngineCollector()
        r.register(self.engines)
        labels = ["model_name"]

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens")
        self.tpot = hist("vllm:time_per_output_token_seconds", "Time per output token (vLLM's older name)")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("vllm:request_queue_time_seconds", "Time from arrival to first schedule")
        by_priority = labels + ["priority"]
        self.queue_by_priority = Histogram("quantserve:request_queue_time_seconds",
                                           "Time from arrival in the engine to first schedule, by priority",
                                           by_priority, buckets=LATENCY_BUCKETS, registry=r)
        self.admission_wait = Histogram("quantserve:admission_wait_seconds",
                                        "Time waiting for a generation slot (the server's queue), by priority",
                                        by_priority, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by reason", labels + ["finished_reason"],
                               registry=r)
        self.rejected = Counter("quantserve:requests_rejected", "Requests refused, by reason", labels + ["reason"],
                                registry=r)
        self.aborted = Counter("quantserve:requests_aborted", "Requests aborted (client gone or cancelled)", labels,
                               registry=r)
        self.engine_restarts = Counter("quantserve:engine_restarts", "Engines restarted after their worker died "
                                       "or a step hung", labels, registry=r)
        self.timed_out = Counter("quantserve:requests_timed_out", "Requests past their deadline (408)", labels,
                                 registry=r)
        self.overflowed = Counter("quantserve:requests_overflowed", "Requests answered by the --overflow-model "
                                  "because this model's queue was full", labels + ["overflow_model"], registry=r)

    def for_model(self, model_name: str, stats: Callable) -> Metrics:
        """The model's view; its engine gauges are read from `stats` (a reload replaces it)."""
        self.engines.sources[model_name] = stats
        return Metrics(self, model_name)

    def forget_engine(self, model_name: str) -> None:
        self.engines.sources.pop(model_name, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Metrics:
    """One model's series of the server's metrics."""

    def __init__(self, hub: ServerMetrics, model_name: str):
        self.hub, self.model_name = hub, model_name
        for name in ("ttft", "itl", "tpot", "e2e", "queue", "prompt_tokens", "generation_tokens", "aborted", "timed_out"):
            setattr(self, name, getattr(hub, name).labels(model_name))

    def success(self, reason: str) -> None:
        self.hub.success.labels(self.model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self.hub.rejected.labels(self.model_name, reason).inc()

    def restarted(self) -> None:
        self.hub.engine_restarts.labels(self.model_name).inc()

    def queued(self, priority: int, seconds: float) -> None:
        """Engine queue time, in vLLM's histogram and in the one by priority."""
        self.queue.observe(seconds)
        self.hub.queue_by_priority.labels(self.model_name, priority_label(priority)).observe(seconds)

    def admission_wait(self, priority: int, seconds: float) -> None:
        self.hub.admission_wait.labels(self.model_name, priority_label(priority)).observe(seconds)

    def overflowed(self, to_model: str) -> None:
        self.hub.overflowed.labels(self.model_name, to_model).inc()


def priority_label(priority: int) -> str:
    """Clients choose priorities: beyond +-10 they share a series, so the label set stays small."""
    return "<=-10" if priority <= -10 else ">=10" if priority >= 10 else str(priority)
