"""`serve proxy` in front of two api_servers: spread, fail-over, recovery, routing by model."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import RunningServer, free_port

INTERVAL = 0.5


class RunningProxy:
    def __init__(self, strategy: str = "min_expected_latency", nodes: list[str] = ()):
        import uvicorn

        from quantserve.serve.proxy import Proxy, build_proxy_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_proxy_app(Proxy(strategy, INTERVAL), nodes=list(nodes)),
                                                    host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.05)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=30)

    def status(self) -> dict:
        return httpx.get(self.url + "/nodes/status").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def served(proxy: RunningProxy) -> dict[str, int]:
    return {url: s["served"] for url, s in proxy.status().items()}


def ask(client: openai.OpenAI, stream: bool = False, model: str = "tiny") -> str:
    if stream:
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    return r.choices[0].message.content


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def nodes(tiny_server_model):
    servers = [RunningServer(tiny_server_model), RunningServer(tiny_server_model)]
    yield servers
    for s in servers:
        s.close()


def test_requests_spread_fail_over_and_come_back(nodes, tiny_server_model):
    proxy = RunningProxy()
    try:
        for node in nodes:
            r = httpx.post(proxy.url + "/nodes/add", json={"url": node.url})
            assert r.status_code == 200 and r.json()["healthy"] and r.json()["models"] == ["tiny"]
        client = proxy.client()
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: ask(client, stream=i % 2 == 0), range(24)))
        counts = served(proxy)
        assert sum(counts.values()) == 24 and all(c >= 4 for c in counts.values()), counts

        down, up = nodes
        port = down.port
        down.close()                                    # stop one api_server under load
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: ask(client, stream=i % 2 == 0), range(24)))
        assert len(answers) == 24                        # every request was answered (by the other node)
        wait_for(lambda: not proxy.status()[down.url]["healthy"])
        before = served(proxy)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: ask(client), range(16)))
        after = served(proxy)
        assert after[up.url] - before[up.url] == 16 and after[down.url] == before[down.url]

        nodes[0] = RunningServer(tiny_server_model, port=port)       # restart it on its address
        wait_for(lambda: proxy.status()[down.url]["healthy"])
        before = served(proxy)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: ask(client), range(24)))
        assert served(proxy)[down.url] > before[down.url]
    finally:
        proxy.close()


def test_routing_by_model_and_errors_in_openais_shape(nodes, tiny_server_model):
    other = RunningServer(tiny_server_model, model_name="other")
    proxy = RunningProxy(strategy="random", nodes=[nodes[0].url, other.url])
    try:
        wait_for(lambda: len(proxy.client().models.list().data) == 2)
        client = proxy.client()
        for _ in range(6):
            ask(client, model="other")
        assert served(proxy) == {nodes[0].url: 0, other.url: 6}
        with pytest.raises(openai.NotFoundError) as e:
            ask(client, model="missing")
        assert e.value.body["code"] == "model_not_found" and "'missing'" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:                 # the node's own 400 comes through
            client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
        assert e.value.body["code"]

        r = httpx.post(proxy.url + "/nodes/remove", json={"url": other.url})
        assert r.json() == {"url": other.url, "removed": True}
        assert httpx.post(proxy.url + "/nodes/remove", json={"url": other.url}).status_code == 404
        assert httpx.post(proxy.url + "/nodes/add", json={"url": "not a url"}).status_code == 400
        with pytest.raises(openai.NotFoundError):
            ask(client, model="other")
        httpx.post(proxy.url + "/nodes/remove", json={"url": nodes[0].url})
        with pytest.raises(openai.InternalServerError) as e:
            ask(client)
        assert e.value.status_code == 503 and e.value.body["code"] == "no_node"
        assert httpx.get(proxy.url + "/health").status_code == 503
    finally:
        proxy.close()
        other.close()


def test_min_expected_latency_prefers_the_idle_node():
    from quantserve.serve.proxy import Node, NodeTable

    table = NodeTable("min_expected_latency")
    for url, unfinished, latency in (("http://a", 3, 1.0), ("http://b", 0, 1.0), ("http://c", 0, 5.0)):
        table.nodes[url] = Node(url, True, [{"id": "m"}], unfinished, latency)
    assert table.choose("m", set()).url == "http://b"
    assert table.choose("m", {"http://b"}).url == "http://a"          # 4 x 1 s beats 1 x 5 s
    table.strategy = "min_observed_latency"
    assert table.choose("m", {"http://b"}).url == "http://a"
    table.nodes["http://a"].healthy = False
    assert table.choose("m", {"http://b"}).url == "http://c"


def test_an_api_server_registers_itself_with_the_proxy(nodes):
    from quantserve.serve.server import register_with_proxy

    proxy = RunningProxy()
    try:
        loaded = threading.Thread(target=lambda: None)
        loaded.start()
        register_with_proxy(proxy.url, nodes[1].url, loaded)
        wait_for(lambda: proxy.status().get(nodes[1].url, {}).get("healthy"))
    finally:
        proxy.close()
