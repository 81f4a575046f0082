"""AsyncEngine: concurrent streams equal the synchronous engine, cancellation frees blocks,
bad requests and failing steps surface as errors without stopping the engine."""
from __future__ import annotations

import asyncio

import pytest

from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.async_engine import AsyncEngine
from quantserve.engine.engine import Engine, RequestError

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9)]
PARAMS = SamplingParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    cfg = EngineConfig(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=8)
    sync = Engine(tiny_llama, cfg, progress=False)
    async_engine = AsyncEngine(Engine(tiny_llama, cfg, progress=False))
    yield sync, async_engine
    async_engine.shutdown()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params=PARAMS) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for event in engine.generate(rid, prompt, params):
        tokens += event.token_ids
        reason = event.finish_reason
    return tokens, reason


def test_concurrent_streams_equal_sync_engine(engines):
    sync, async_engine = engines
    expected = []
    for i, p in enumerate(PROMPTS):
        r = sync.add_request(f"s{i}", p, PARAMS)
        while sync.has_work:
            sync.step()
        expected.append(r.output_token_ids)

    async def main():
        return await asyncio.gather(*(collect(async_engine, f"a{i}", p) for i, p in enumerate(PROMPTS)))

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(reason == "length" for _, reason in results)


def test_cancelled_stream_frees_its_blocks(engines):
    _, async_engine = engines
    blocks = async_engine.engine.scheduler.blocks

    async def main():
        gen = async_engine.generate("c", PROMPTS[2], SamplingParams(max_new_tokens=200))
        await gen.__anext__()
        await gen.aclose()                       # the client went away
        for _ in range(100):
            if blocks.num_free_blocks == blocks.num_blocks and not async_engine.engine.requests:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())


def test_bad_request_raises_and_engine_keeps_serving(engines):
    _, async_engine = engines

    async def main():
        with pytest.raises(RequestError, match="empty"):
            await collect(async_engine, "bad", [])
        return await collect(async_engine, "good", PROMPTS[0])

    tokens, reason = asyncio.run(main())
    assert len(tokens) == 16 and reason == "length"


def test_failing_step_fails_its_requests_only(engines):
    _, async_engine = engines
    runner = async_engine.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def flaky(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("injected fault")
        return original(out)

    runner.execute = flaky
    try:
        async def main():
            with pytest.raises(RuntimeError, match="injected fault"):
                await collect(async_engine, "f1", PROMPTS[1])
            return await collect(async_engine, "f2", PROMPTS[1])

        tokens, _ = asyncio.run(main())
    finally:
        runner.execute = original
    assert len(tokens) == 16


def test_shutdown_fails_open_streams_instead_of_leaving_them_waiting(tiny_llama):
    cfg = EngineConfig(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=8)
    engine = AsyncEngine(Engine(tiny_llama, cfg, progress=False))

    async def run():
        stream = engine.generate("long", PROMPTS[0], SamplingParams(max_new_tokens=200, eos_token_ids=()))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(RuntimeError, match="stopped"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(run(), 30))


def test_logprobs_are_of_the_unmasked_distribution(engines):
    import torch

    from quantserve.engine import sampler
    from quantserve.engine.request import Request

    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])       # token 2 (EOS) is the most likely
    request = Request("r", [1], SamplingParams(min_new_tokens=2, eos_token_ids=(2,), logprobs=2), 64)
    tokens = sampler.sample(logits, [request])
    sampler.record_logprobs(logits, tokens, [request])
    expected = logits[0].log_softmax(-1)
    assert tokens == [3]                                # EOS is masked for the draw ...
    entry = request.output_logprobs[0]
    assert entry.top[0][0] == 2 and entry.top[0][1] == pytest.approx(float(expected[2]))   # ... not for logprobs
    assert entry.logprob == pytest.approx(float(expected[3]))
