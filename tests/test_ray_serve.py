"""`serve ray`: two replicas of the default model on a local Ray cluster, a replica killed under load."""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server(default_model):
    from ray import serve

    from quantserve.config import EngineConfig
    from quantserve.serve.ray_app import ReplicaSpec, build_application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = EngineConfig(cache_max_tokens=16384, max_batch_size=32, num_threads=1, enable_prefix_caching=True)
    spec = ReplicaSpec("smol", str(default_model), dataclasses.asdict(engine))
    serve.run(build_application(spec, num_replicas=2, cpus_per_replica=1, max_ongoing_requests=32),
              name="quantserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def replicas() -> dict[str, int]:
    from ray import serve

    return serve.status().applications["quantserve"].deployments["EngineReplica"].replica_states


def ask(client: openai.OpenAI, i: int, stream: bool, tokens: int = 32) -> tuple[str, int]:
    """One chat request; `tokens` exactly (EOS ignored), so a request's length is known."""
    messages = [{"role": "user", "content": f"Count from {i} to {i + 20}."}]
    kw = dict(model="smol", messages=messages, max_tokens=tokens, extra_body={"ignore_eos": True})
    if stream:
        chunks = client.chat.completions.create(stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), 1
    raw = client.chat.completions.with_raw_response.create(**kw)
    return raw.parse().choices[0].message.content, int(raw.headers["x-quantserve-attempts"])


def test_32_concurrent_requests_on_two_replicas(ray_server):
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smol"]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: ask(client, i, stream=i % 2 == 0), range(32)))
    assert len(answers) == 32 and all(text for text, _ in answers)
    with pytest.raises(openai.NotFoundError) as e:                    # the replica's own errors come through
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_a_replica_killed_under_load_loses_no_request_and_comes_back(ray_server):
    from ray.util import list_named_actors

    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0, timeout=300)
    victim = next(a for a in list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"])
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(ask, client, i, False, 384) for i in range(32)]
        time.sleep(3.0)             # all accepted, none answered yet: 16 x 384 tokens a replica take longer
        assert not any(f.done() for f in futures)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        answers = [f.result() for f in futures]                     # a failed request raises here
    assert all(text for text, _ in answers)
    assert any(attempts > 1 for _, attempts in answers), "no request was on the killed replica"
    deadline = time.monotonic() + 120
    while replicas().get("RUNNING") != 2:
        assert time.monotonic() < deadline, replicas()
        time.sleep(1)
    assert ask(client, 0, stream=False)[0]


def test_overload_gets_429_and_autoscaling_adds_a_replica(ray_server, default_model):
    import threading

    import httpx
    from ray import serve

    from quantserve.config import EngineConfig
    from quantserve.serve.ray_app import ReplicaSpec, build_application

    engine = EngineConfig(cache_max_tokens=8192, max_batch_size=8, num_threads=1)
    spec = ReplicaSpec("smol", str(default_model), dataclasses.asdict(engine))
    serve.delete("quantserve")
    serve.run(build_application(spec, autoscale=(1, 2), max_ongoing_requests=2, max_queued_requests=2),
              name="quantserve", route_prefix="/")
    assert replicas() == {"RUNNING": 1}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: httpx.post(ray_server + "/v1/chat/completions", json=body, timeout=300),
                                range(12)))
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded" for r in refused)
    assert all(r.status_code == 200 for r in answers if r.status_code != 429)

    stop = threading.Event()

    def steady():
        while not stop.is_set():
            httpx.post(ray_server + "/v1/chat/completions", json=body, timeout=300)

    workers = [threading.Thread(target=steady) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 120
        while replicas().get("RUNNING") != 2:
            assert time.monotonic() < deadline, replicas()
            time.sleep(1)
    finally:
        stop.set()
        for w in workers:
            w.join(300)
