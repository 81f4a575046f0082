"""Request priorities, deadlines and overflow to a sibling model: the scheduler on a tiny model
with real steps, then real servers through the official openai client."""
from __future__ import annotations

import pytest

from quantserve.config import EngineConfig, SamplingParams
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
