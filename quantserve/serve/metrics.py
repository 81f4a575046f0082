"""Prometheus metrics under vLLM's names, so existing vLLM dashboards work unchanged.

Latency histograms are observed as requests stream; engine gauges (running, waiting, KV usage)
and the prefix-cache counters are read from the engine when /metrics is scraped.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class EngineCollector:
    """Gauges and counters that live in the engine, read at scrape time."""

    def __init__(self, model_name: str, stats: Callable):
        self.labels = {"model_name": model_name}
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:
            return
        gauges = [("vllm:num_requests_running", "Requests in the running batch", s.num_running),
                  ("vllm:num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting),
                  ("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", s.kv_usage),
                  ("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full; vLLM's older name)", s.kv_usage),
                  ("quantserve:kv_cache_blocks_total", "KV cache blocks", s.num_blocks),
                  ("quantserve:kv_cache_blocks_free", "Free KV cache blocks", s.num_free_blocks)]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=list(self.labels))
            g.add_metric(list(self.labels.values()), value)
            yield g
        for name, doc, value in [("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  s.prefix_queried_tokens),
                                 ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  s.prefix_hit_tokens)]:
            c = CounterMetricFamily(name, doc, labels=list(self.labels))
            c.add_metric(list(self.labels.values()), value)
            yield c


class Metrics:
    def __init__(self, model_name: str, stats: Callable):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(model_name, stats))
        labels, r = ["model_name"], self.registry

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens")
        self.tpot = hist("vllm:time_per_output_token_seconds", "Time per output token (vLLM's older name)")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("vllm:request_queue_time_seconds", "Time from arrival to first schedule")
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by reason", labels + ["finished_reason"],
                                registry=r)
        self._rejected = Counter("quantserve:requests_rejected", "Requests refused, by reason",
                                 labels + ["reason"], registry=r)
        self.aborted = Counter("quantserve:requests_aborted", "Requests aborted (client gone or cancelled)",
                               labels, registry=r).labels(model_name)
        self.model_name = model_name

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
