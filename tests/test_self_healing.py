"""Self-healing: a model whose engine worker dies, or whose step hangs past --step-timeout, has its
requests failed with a 503 that says so, is 503 on /health while its engine restarts, and then
answers again in the same process, with the restart counted in /metrics."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import RunningServer

PROMPT = "the quick brown fox"


class WorkerKilled(BaseException):
    """Escapes the worker's per-step handler (an Exception fails only that step's requests)."""


@pytest.fixture
def server(tiny_server_model):
    s = RunningServer(tiny_server_model, step_timeout=2.0)
    yield s
    s.close()


def complete(client: openai.OpenAI, max_tokens: int = 8) -> str:
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.choices[0].text


def chat_stream(client: openai.OpenAI) -> str:
    text = ""
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=400, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}):
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    return text


def arm_fault(monkeypatch, server: RunningServer, fault) -> threading.Event:
    """The engine's runner calls `fault()` at its first step after the returned event is set; until
    then each step is slowed, so requests stay in flight until the test arms it."""
    runner = server.engine.engine.runner
    real, armed, fired = runner.execute, threading.Event(), threading.Event()

    def execute(out):
        if armed.is_set() and not fired.is_set():
            fired.set()
            fault()
        elif not armed.is_set():
            time.sleep(0.02)
        return real(out)

    monkeypatch.setattr(runner, "execute", execute)
    return armed


def gate_loader(server: RunningServer) -> threading.Event:
    """Restarts wait for the returned event before loading, so the restart's 503 can be seen."""
    real, gate = server.state.models.loader, threading.Event()

    def load(*args):
        gate.wait(60)
        return real(*args)

    server.state.models.loader = load
    return gate


def run_in_flight(server: RunningServer, armed: threading.Event) -> list:
    """Four requests (two streamed chats, two whole completions) running when the fault is armed;
    what each ended with."""
    client = server.client(timeout=60)
    jobs = [lambda: chat_stream(client)] * 2 + [lambda: complete(client, max_tokens=400)] * 2

    def outcome(job):
        try:
            return job()
        except openai.APIError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(outcome, job) for job in jobs]
        deadline = time.monotonic() + 60
        while server.engine.stats().num_running < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.stats().num_running == 4
        armed.set()
        return [f.result() for f in futures]


def wait_status(url: str, status: int) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(url + "/health").status_code != status:
        assert time.monotonic() < deadline, f"/health never became {status}"
        time.sleep(0.05)


def restarts(server: RunningServer) -> str:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return next((line.split()[-1] for line in lines
                 if line.startswith('quantserve:engine_restarts_total{model_name="tiny"}')), "none")


def check_failed_and_healed(server: RunningServer, outcomes: list, gate: threading.Event, cause: str,
                            before: str) -> None:
    for outcome in outcomes:                 # every admitted request: an error that says why, none lost
        assert isinstance(outcome, openai.APIError), outcome
        assert cause in outcome.message and "restarted" in outcome.message
    assert all(o.status_code == 503 for o in outcomes if isinstance(o, openai.APIStatusError))
    wait_status(server.url, 503)             # the restart is held at its load
    deadline = time.monotonic() + 30         # the watchdog's next round marks it
    while [m.status for m in server.client().models.list().data] != ["restarting"]:
        assert time.monotonic() < deadline, "/v1/models never showed the model restarting"
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as during:
        complete(server.client())
    assert during.value.status_code == 503 and "restarting" in during.value.message
    gate.set()
    wait_status(server.url, 200)
    assert complete(server.client()) == before
    assert restarts(server) == "1.0"


def test_a_dead_worker_fails_its_requests_and_the_engine_restarts(server, monkeypatch):
    before = complete(server.client())
    old = server.engine

    def kill():
        raise WorkerKilled("injected worker death")

    armed = arm_fault(monkeypatch, server, kill)
    gate = gate_loader(server)
    outcomes = run_in_flight(server, armed)
    assert not old.worker.is_alive()
    check_failed_and_healed(server, outcomes, gate, "the engine worker died", before)
    assert server.engine is not old


def test_a_hung_step_is_abandoned_and_the_engine_restarts(server, monkeypatch):
    before = complete(server.client())
    old = server.engine
    armed = arm_fault(monkeypatch, server, lambda: time.sleep(6))      # past the 2 s step timeout
    gate = gate_loader(server)
    outcomes = run_in_flight(server, armed)
    check_failed_and_healed(server, outcomes, gate, "step timeout", before)
    old.worker.join(30)                      # the hung step returns, and its thread ends, freeing the engine
    assert not old.worker.is_alive()


def test_a_failed_step_fails_its_requests_without_a_restart(server, monkeypatch):
    from conftest import fail_engine_step

    old = server.engine
    fail_engine_step(monkeypatch, server, step=2)
    with pytest.raises(openai.APIStatusError) as failed:
        complete(server.client(), max_tokens=20)
    assert failed.value.status_code == 500 and "injected fault" in failed.value.message
    time.sleep(0.5)                          # two watchdog rounds: it must leave a live engine alone
    assert server.engine is old and old.alive
    assert restarts(server) == "none"
    assert complete(server.client())
