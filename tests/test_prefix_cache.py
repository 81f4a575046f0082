"""Prefix caching: shared full blocks, identical outputs, reference counts, LRU eviction."""
from __future__ import annotations

from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine

SHARED = [(7 * i) % 300 + 3 for i in range(150)]          # 150 tokens = 9 full blocks of 16


def make(model_dir, **kw) -> Engine:
    cfg = dict(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=8)
    return Engine(model_dir, EngineConfig(**{**cfg, **kw}), progress=False)


def generate(engine, prompts, new=12):
    reqs = [engine.add_request(f"q{i}-{id(prompts)}", p, SamplingParams(max_new_tokens=new)) for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    return [r.output_token_ids for r in reqs], reqs


def test_second_request_reuses_prefix_with_same_output(tiny_llama):
    prompts = [SHARED + [5, 6, 7], SHARED + [9, 10]]
    plain, _ = generate(make(tiny_llama), prompts)
    cached_engine = make(tiny_llama, enable_prefix_caching=True)
    first, _ = generate(cached_engine, prompts[:1])
    second, reqs = generate(cached_engine, prompts[1:])
    assert first + second == plain
    assert reqs[0].num_cached_tokens == 144                 # 9 blocks
    blocks = cached_engine.scheduler.blocks
    assert blocks.hit_tokens == 144 and blocks.num_free_blocks == blocks.num_blocks


def test_concurrent_requests_share_blocks(tiny_llama):
    engine = make(tiny_llama, enable_prefix_caching=True)
    generate(engine, [SHARED + [1]])
    a = engine.add_request("a", SHARED + [2, 3], SamplingParams(max_new_tokens=30))
    b = engine.add_request("b", SHARED + [4], SamplingParams(max_new_tokens=30))
    engine.step()
    assert a.block_ids[:9] == b.block_ids[:9]
    assert all(engine.scheduler.blocks.ref_counts[x] == 2 for x in a.block_ids[:9])
    engine.abort("a")
    assert all(engine.scheduler.blocks.ref_counts[x] == 1 for x in b.block_ids[:9])
    engine.abort("b")
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_whole_prompt_cached_still_computes_last_token(tiny_llama):
    engine = make(tiny_llama, enable_prefix_caching=True)
    prompt = SHARED[:144]                                   # exactly 9 blocks
    out1, _ = generate(engine, [prompt])
    out2, reqs = generate(engine, [prompt])
    assert out1 == out2 and reqs[0].num_cached_tokens == 128


def test_eviction_under_pressure_keeps_outputs(tiny_llama):
    """A cache of 20 blocks, prompts that share prefixes and prompts that don't: cached blocks
    are evicted to make room, running requests are never corrupted."""
    prompts = [SHARED[:40 + 10 * (i % 3)] + [i + 3] * (5 + i) for i in range(10)]
    prompts += [[(i * 13 + j) % 300 + 3 for j in range(60)] for i in range(6)]
    expected, _ = generate(make(tiny_llama, cache_max_tokens=2048, max_batch_size=16), prompts, new=20)
    small = make(tiny_llama, enable_prefix_caching=True, cache_max_tokens=320, session_len=160, max_batch_size=4)
    got = [generate(small, [p], new=20)[0][0] for p in prompts[:5]]
    got += generate(small, prompts[5:], new=20)[0]
    assert got == expected
    blocks = small.scheduler.blocks
    assert blocks.hit_tokens > 0 and blocks.num_free_blocks == blocks.num_blocks
    assert len(blocks.cached) <= blocks.num_blocks


def test_a_pinned_prefix_survives_other_traffic_until_unpinned(tiny_llama):
    """A session's conversation (pinned when its request ends) is found again after traffic that
    evicts every unpinned cached block; without the pin the same traffic evicts it."""
    fillers = [[(i * 31 + j * 7) % 300 + 3 for j in range(200)] for i in range(4)]     # 13 blocks each
    found = {}
    for owner in ("session", None):
        engine = make(tiny_llama, enable_prefix_caching=True, cache_max_tokens=512)   # 32 blocks, 16 pinnable
        first = engine.add_request("turn1", SHARED[:100], SamplingParams(max_new_tokens=12), pin_owner=owner)
        while engine.has_work:
            engine.step()
        blocks = engine.scheduler.blocks
        assert blocks.num_pinned_blocks == (6 if owner else 0)        # (100 + 12 - 1) // 16 full blocks
        for filler in fillers:
            generate(engine, [filler], new=4)
        _, (second,) = generate(engine, [first.all_token_ids + [5, 6]], new=2)
        found[owner] = second.num_cached_tokens
        engine.unpin("session")
        assert blocks.num_pinned_blocks == 0 and blocks.num_free_blocks == blocks.num_blocks
    assert found == {"session": 96, None: 0}


def test_pins_give_way_oldest_first_and_leave_room_for_a_session(tiny_llama):
    engine = make(tiny_llama, enable_prefix_caching=True, cache_max_tokens=512)
    blocks = engine.scheduler.blocks
    assert blocks.max_pinned_blocks == 16                             # 32 blocks less one 256-token session
    for k, owner in enumerate(("a", "b", "c")):
        prompt = [(k * 53 + j * 11) % 300 + 3 for j in range(100)]
        engine.add_request(owner, prompt, SamplingParams(max_new_tokens=12), pin_owner=owner)
        while engine.has_work:
            engine.step()
    assert list(blocks.pins) == ["b", "c"] and blocks.num_pinned_blocks == 12
    out, (r,) = generate(engine, [[7] * 250], new=6)                   # a whole session still fits
    assert len(out[0]) == 6 and r.num_preemptions == 0
