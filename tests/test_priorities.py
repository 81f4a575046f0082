"""Request priorities, deadlines and overflow to a sibling model: the scheduler on a tiny model
with real steps, then real servers through the official openai client."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import RunningServer
from quantserve.config import EngineConfig, Limits, SamplingParams
from quantserve.engine.engine import Engine


def make_engine(model_dir, **kw) -> Engine:
    cfg = dict(dtype="float32", cache_block_seq_len=16, session_len=160, max_batch_size=8)
    return Engine(model_dir, EngineConfig(**{**cfg, **kw}), progress=False)


def finish_order(engine: Engine) -> list[str]:
    done = []
    while engine.has_work:
        done += [r.request_id for r in engine.step() if r.is_finished]
    return done


@pytest.mark.parametrize("high", [-1, 5])
def test_waiting_requests_are_admitted_by_priority_then_arrival(tiny_llama, high):
    engine = make_engine(tiny_llama, max_batch_size=1)
    engine.add_request("first", [5, 6, 7], SamplingParams(max_new_tokens=4, priority=5))
    engine.step()                                 # "first" holds the only slot
    for rid in ("b", "c"):
        engine.add_request(rid, [5, 6, 7], SamplingParams(max_new_tokens=4, priority=5))
    engine.add_request("late", [5, 6, 7], SamplingParams(max_new_tokens=4, priority=high))
    expected = ["first", "late", "b", "c"] if high < 5 else ["first", "b", "c", "late"]
    assert finish_order(engine) == expected


def test_preemption_takes_the_low_priority_request_even_if_it_came_first(tiny_llama):
    prompt = list(range(5, 45))
    alone = make_engine(tiny_llama)
    ref = alone.add_request("ref", prompt, SamplingParams(max_new_tokens=100))
    finish_order(alone)
    small = make_engine(tiny_llama, cache_max_tokens=160)          # 10 blocks: both cannot grow to 140 tokens
    low = small.add_request("low", prompt, SamplingParams(max_new_tokens=100, priority=3))
    high = small.add_request("high", prompt, SamplingParams(max_new_tokens=100, priority=0))
    assert finish_order(small) == ["high", "low"]
    assert high.num_preemptions == 0 and low.num_preemptions > 0
    assert low.output_token_ids == high.output_token_ids == ref.output_token_ids
    assert small.scheduler.blocks.num_free_blocks == small.plan.num_blocks


def test_equal_priorities_preempt_the_latest_arrival(tiny_llama):
    small = make_engine(tiny_llama, cache_max_tokens=160)
    prompt = list(range(5, 45))
    first = small.add_request("first", prompt, SamplingParams(max_new_tokens=100))
    second = small.add_request("second", prompt, SamplingParams(max_new_tokens=100))
    assert finish_order(small) == ["first", "second"]
    assert first.num_preemptions == 0 and second.num_preemptions > 0


# ---- the server ------------------------------------------------------------------------------

def test_slots_pass_on_past_cancelled_waiters_and_lose_none():
    import asyncio

    from quantserve.serve.admission import Slots

    async def scenario():
        slots, got = Slots(1), []
        await slots.acquire(0)

        async def wait(name, priority):
            await slots.acquire(priority)
            got.append(name)

        tasks = {name: asyncio.create_task(wait(name, p)) for name, p in (("low", 5), ("gone", -3), ("high", 0))}
        await asyncio.sleep(0)
        tasks["gone"].cancel()                     # the best waiter gives up
        await asyncio.sleep(0)
        slots.release()
        await asyncio.sleep(0)
        assert got == ["high"]
        slots.release()
        await asyncio.sleep(0)
        assert got == ["high", "low"]
        slots.release()
        return slots.free, slots.waiters

    assert asyncio.run(scenario()) == (1, [])

    async def handed_then_cancelled():
        slots, got = Slots(1), []
        await slots.acquire(0)

        async def wait(name):
            await slots.acquire(0)
            got.append(name)

        first, second = asyncio.create_task(wait("first")), asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        slots.release()                            # the slot is handed to "first"...
        first.cancel()                             # ...which is cancelled before it runs: it passes it on
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert got == ["second"] and first.cancelled() and second.done()
        slots.release()
        return slots.free

    assert asyncio.run(handed_then_cancelled()) == 1


def wait_until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def chat(client: openai.OpenAI, max_tokens: int, model: str = "tiny", **fields):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True, **fields})


LONG = 2000            # tokens: seconds of work for the tiny model, so it holds its slot


@pytest.fixture(scope="module")
def one_slot(tiny_server_model):
    server = RunningServer(tiny_server_model, limits=Limits(max_concurrent_requests=1, max_queued_requests=2))
    yield server
    server.close()


def engine_idle(server: RunningServer, free_blocks: int) -> bool:
    stats = server.engine.stats()
    return stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == free_blocks


def test_queued_high_priority_is_served_before_an_earlier_low_priority(one_slot):
    client, slots = one_slot.client(), one_slot.state.service.slots
    finished = []

    def run(name: str, max_tokens: int, priority: int):
        chat(client, max_tokens, priority=priority)
        finished.append(name)

    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(run, "busy", LONG, 0)
        wait_until(lambda: one_slot.engine.stats().num_running == 1)
        low = pool.submit(run, "low", 300, 5)
        wait_until(lambda: len(slots.waiters) == 1)
        high = pool.submit(run, "high", 4, -1)
        wait_until(lambda: len(slots.waiters) == 2)
        assert not busy.done()                  # both queued while the slot was taken
        for f in (busy, low, high):
            f.result()
    assert finished == ["busy", "high", "low"]
    metrics = httpx.get(one_slot.url + "/metrics").text
    assert 'quantserve:admission_wait_seconds_count{model_name="tiny",priority="-1"} 1.0' in metrics
    assert 'quantserve:request_queue_time_seconds_count{model_name="tiny",priority="5"} 1.0' in metrics
    chat(client, 1, priority=12345)
    chat(client, 1, priority=99)            # far priorities share one series
    metrics = httpx.get(one_slot.url + "/metrics").text
    assert 'quantserve:admission_wait_seconds_count{model_name="tiny",priority=">=10"} 2.0' in metrics


def test_timeout_while_generating_is_408_and_frees_the_blocks(one_slot):
    client = one_slot.client()
    free = one_slot.engine.stats().num_free_blocks
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, LONG, timeout=0.5)
    assert e.value.status_code == 408
    assert e.value.body["code"] == "timeout" and "generating" in e.value.body["message"]
    wait_until(lambda: engine_idle(one_slot, free))
    assert chat(client, 4).choices[0].finish_reason == "length"      # the server keeps serving


def test_timeout_while_streaming_is_an_error_event(one_slot):
    client = one_slot.client()
    free = one_slot.engine.stats().num_free_blocks
    chunks = 0
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=LONG, stream=True,
                                                extra_body={"ignore_eos": True, "timeout": 0.5}):
            chunks += 1
    assert chunks > 1 and "timeout of 0.5 s" in e.value.message
    wait_until(lambda: engine_idle(one_slot, free))


def test_responses_and_messages_take_the_timeout_too(one_slot):
    client = one_slot.client()

    def responses():
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="tiny", input="hi", extra_body={"timeout": 0.3, "priority": 2})
        return e.value.status_code

    def messages():
        return httpx.post(one_slot.url + "/v1/messages", timeout=60,
                          json={"model": "tiny", "max_tokens": 8, "timeout": 0.3, "priority": -2,
                                "messages": [{"role": "user", "content": "hi"}]})

    with ThreadPoolExecutor(3) as pool:             # neither API has ignore_eos: they time out queued
        busy = pool.submit(chat, client, LONG)
        wait_until(lambda: one_slot.engine.stats().num_running == 1)
        queued = [pool.submit(responses), pool.submit(messages)]
        assert queued[0].result() == 408
        r = queued[1].result()
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        assert not busy.done()
        busy.result()


def test_timeout_while_queued_is_408(one_slot):
    client = one_slot.client()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(chat, client, LONG)
        wait_until(lambda: one_slot.engine.stats().num_running == 1)
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, 4, timeout=0.5)
        assert not busy.done()
        busy.result()
    assert e.value.status_code == 408 and "queued" in e.value.body["message"]
    slots = one_slot.state.service.slots
    assert not slots.waiters and slots.free == 1 and one_slot.state.service.active == 0    # no slot lost


def test_request_timeout_applies_by_default(tiny_server_model):
    server = RunningServer(tiny_server_model, limits=Limits(request_timeout=0.5))
    try:
        client = server.client()
        free = server.engine.stats().num_free_blocks
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, LONG)
        assert e.value.status_code == 408
        wait_until(lambda: engine_idle(server, free))
        assert chat(client, 4, timeout=60).choices[0].finish_reason == "length"   # its own timeout wins
        metrics = httpx.get(server.url + "/metrics").text
        assert 'quantserve:requests_timed_out_total{model_name="tiny"} 1.0' in metrics
    finally:
        server.close()


@pytest.fixture
def two_models(tiny_server_model):
    """Models a and b (the same weights), one slot each and no queue; b takes a's overflow."""
    server = RunningServer(tiny_server_model, model_name="a", overflow_model="b",
                           limits=Limits(max_concurrent_requests=1, max_queued_requests=0))
    models = server.state.models
    models.add("b", *models.loader("b", str(tiny_server_model), {}), str(tiny_server_model))
    yield server
    server.close()


def metric(server: RunningServer, line_start: str) -> str | None:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return next((line.rsplit(" ", 1)[1] for line in lines if line.startswith(line_start)), None)


def test_a_full_model_overflows_to_its_sibling_and_429_when_both_are_full(two_models):
    client, models = two_models.client(), two_models.state.models
    engine_a, engine_b = models.get("a").engine, models.get("b").engine
    with ThreadPoolExecutor(2) as pool:
        busy_a = pool.submit(chat, client, LONG, "a")
        wait_until(lambda: engine_a.stats().num_running == 1)
        raw = client.chat.completions.with_raw_response.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True})
        assert raw.headers["x-quantserve-overflow"] == "b"
        assert raw.parse().model == "b" and raw.parse().usage.completion_tokens == 4
        assert metric(two_models, 'vllm:generation_tokens_total{model_name="b"}') == "4.0"
        with client.chat.completions.with_streaming_response.create(
                model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=LONG, stream=True,
                extra_body={"ignore_eos": True}) as streamed:
            assert streamed.headers["x-quantserve-overflow"] == "b"
            first = next(iter(streamed.parse()))
            assert first.model == "b" and engine_b.stats().num_running == 1
            with pytest.raises(openai.RateLimitError):            # a and b both full
                chat(client, 4, "a")
        assert not busy_a.done()
        busy_a.result()
    assert metric(two_models, 'quantserve:requests_overflowed_total{model_name="a",overflow_model="b"}') == "2.0"
    wait_until(lambda: engine_b.stats().num_running == 0)
    for name in ("a", "b"):                     # both keep serving, each under its own name
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert raw.parse().model == name and "x-quantserve-overflow" not in raw.headers


def test_flags_reach_the_server_config_and_a_bad_overflow_model_is_a_cli_error(tiny_server_model):
    import subprocess
    import sys

    from quantserve.cli.main import build_parser
    from quantserve.cli.serve import limits_from, server_fields

    ns = build_parser().parse_args(["serve", "api_server", "x", "y", "--model-name", "a", "b",
                                    "--overflow-model", "b", "--request-timeout", "2.5"])
    assert server_fields(ns)["overflow_model"] == "b" and limits_from(ns).request_timeout == 2.5
    proc = subprocess.run([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server",
                           str(tiny_server_model), "--model-name", "a", "--overflow-model", "z"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "overflow_model" in proc.stderr.replace("-", "_") and "'z'" in proc.stderr, proc.stderr
