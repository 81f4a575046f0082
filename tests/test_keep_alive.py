"""Keep-alive (Ollama's): a model idle past its keep-alive releases its engine, weights and KV cache,
stays listed as unloaded, and the next request loads it again and gets the same answer."""
from __future__ import annotations

import gc
import time
import weakref

import httpx
import openai
import pytest

from conftest import RunningServer

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture
def server(tiny_server_model):
    s = RunningServer(tiny_server_model, keep_alive=1.0)
    yield s
    s.close()


def chat(client: openai.OpenAI, **extra) -> str:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, **extra})
    return r.choices[0].message.content


def status(server: RunningServer) -> str:
    (card,) = server.client().models.list().data
    return card.status


def wait_status(server: RunningServer, wanted: str) -> None:
    deadline = time.monotonic() + 30
    while status(server) != wanted:
        assert time.monotonic() < deadline, f"the model never became {wanted}"
        time.sleep(0.05)


def stopped(worker) -> bool:
    """The engine's thread has ended: "unloaded" shows as the model leaves service, and its engine
    stops right after (shutdown joins the thread for up to 10 s)."""
    worker.join(10)
    return not worker.is_alive()


def test_an_idle_model_unloads_and_the_next_request_loads_it_again(server):
    client = server.client()
    before = chat(client, keep_alive="1h")   # an hour: "loaded" below, however slow the machine
    assert status(server) == "loaded"
    worker, engine = server.engine.worker, weakref.ref(server.engine.engine)
    assert chat(client) == before            # no keep_alive: the server's 1 s again
    wait_status(server, "unloaded")
    assert stopped(worker)
    gc.collect()
    assert engine() is None                  # nothing holds the weights and KV cache any more
    assert httpx.get(server.url + "/health").status_code == 200        # idle is not unhealthy
    assert chat(client, keep_alive="1h") == before      # this request waited for the load
    assert status(server) == "loaded" and server.engine.worker.is_alive()


def test_a_request_keep_alive_overrides_the_server_one(server):
    client = server.client()
    chat(client, keep_alive="-1")
    worker = server.engine.worker
    time.sleep(3)                            # three times the server's 1 s: a dozen watchdog rounds
    assert status(server) == "loaded" and worker.is_alive()
    chat(client, keep_alive="0")             # from now: unload as soon as it is idle
    wait_status(server, "unloaded")
    assert stopped(worker)
    chat(client, keep_alive="1h")
    time.sleep(3)
    assert status(server) == "loaded"


def test_minus_one_never_unloads(tiny_server_model):
    from quantserve.values import parse_duration

    server = RunningServer(tiny_server_model, keep_alive=parse_duration("-1"))
    try:
        before = chat(server.client())
        worker = server.engine.worker
        time.sleep(3)
        assert status(server) == "loaded" and worker.is_alive()
        assert chat(server.client()) == before
    finally:
        server.close()


def test_a_bad_keep_alive_is_a_400_naming_it(server):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(server.client(), keep_alive="5 fortnights")
    assert "keep_alive" in bad.value.message


def test_durations_and_the_flag():
    from quantserve.cli.args import config_values
    from quantserve.cli.main import build_parser
    from quantserve.config import ServerConfig
    from quantserve.values import parse_duration

    assert [parse_duration(t) for t in ("5m", "30s", "1h", "0", "1h30m", "500ms", "90", 2.5)] == \
        [300, 30, 3600, 0, 5400, 0.5, 90, 2.5]
    assert parse_duration("-1") == parse_duration("-5m") == float("inf")
    for bad in ("5x", "m", "", "5m5", "nan"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    ns = build_parser().parse_args(["serve", "api_server", "--keep-alive", "5m", "--step-timeout", "30"])
    values = config_values(ns, ServerConfig)
    assert values["keep_alive"] == 300 and values["step_timeout"] == 30
    assert config_values(build_parser().parse_args(["serve", "api_server"]), ServerConfig)["keep_alive"] == float("inf")


def test_an_open_session_keeps_its_model_loaded_until_it_closes(server):
    from test_ws_session import session

    with session(server) as s:
        s.send(type="session.start", model="tiny")
        assert s.recv()["type"] == "session.started"
        text, done = s.turn("the quick brown fox " * 40, max_tokens=4, temperature=0)   # blocks to pin
        assert done["type"] == "done", done
        assert server.engine.stats().num_pinned_blocks > 0
        worker = server.engine.worker
        time.sleep(3)                        # the server's keep-alive is 1 s: its pinned KV keeps it in use
        assert status(server) == "loaded" and worker.is_alive()
    wait_status(server, "unloaded")          # closed: its blocks are unpinned, and the model goes idle
    assert stopped(worker)


def test_requests_to_an_unloaded_model_share_one_load(server):
    from concurrent.futures import ThreadPoolExecutor

    before = chat(server.client())
    real, loads = server.state.models.loader, []

    def load(*args):
        loads.append(args[0])
        return real(*args)

    server.state.models.loader = load
    wait_status(server, "unloaded")
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: chat(server.client(), keep_alive="1h"), range(4)))
    assert texts == [before] * 4 and loads == ["tiny"]


def test_an_embedding_model_unloads_and_loads_again(minilm_dir):
    server = RunningServer(minilm_dir, model_name="minilm", keep_alive=1.0)
    try:
        client = server.client()
        before = client.embeddings.create(model="minilm", input=["a sentence to embed"]).data[0].embedding
        worker = server.engine.worker
        (card,) = client.models.list().data
        deadline = time.monotonic() + 30
        while card.status != "unloaded":
            assert time.monotonic() < deadline, "the encoder never unloaded"
            time.sleep(0.05)
            (card,) = client.models.list().data
        assert stopped(worker)
        after = client.embeddings.create(model="minilm", input=["a sentence to embed"]).data[0].embedding
        assert after == pytest.approx(before, abs=1e-6)
    finally:
        server.close()
