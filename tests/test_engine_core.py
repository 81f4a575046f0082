"""The engine's core with no model: the scheduler and block manager driven by fabricated sampled
tokens, and the sampler's filters and penalties against hand-worked numbers."""
from __future__ import annotations

import math

import pytest
import torch

from quantserve.config import SamplingParams
from quantserve.engine import sampler
from quantserve.engine.block_manager import BlockManager
from quantserve.engine.request import Request, Status
from quantserve.engine.scheduler import Scheduler

BS = 4          # tokens per block


def request(rid: str, prompt: list[int], max_new: int = 8, **params) -> Request:
    return Request(rid, prompt, SamplingParams(max_new_tokens=max_new, **params), max_total_tokens=64)


def step(s: Scheduler, token: int = 7) -> dict[str, int]:
    """One schedule + update with every sampling request given `token`; {id: tokens computed}."""
    out = s.schedule()
    counts = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    s.update(out, {x.request.request_id: token for x in out.scheduled if x.samples})
    return counts


def test_the_token_budget_chunks_prefills_in_arrival_order():
    s = Scheduler(BlockManager(16, BS), max_batch_size=8, token_budget=8)
    for rid, n in (("a", 6), ("b", 5), ("c", 3)):
        s.add(request(rid, list(range(1, n + 1))))
    assert step(s) == {"a": 6, "b": 2}                  # 6 + 2 = the budget; c waits
    assert step(s) == {"a": 1, "b": 3, "c": 3}          # a decodes, b finishes its prompt, c joins
    a, b, c = sorted(s.running, key=lambda r: r.request_id)
    assert (len(a.output_token_ids), len(b.output_token_ids), len(c.output_token_ids)) == (2, 1, 1)
    assert [len(r.block_ids) for r in (a, b, c)] == [2, 2, 1]       # ceil(tokens held / 4)
    assert s.blocks.num_free_blocks == 16 - 5


def test_out_of_blocks_preempts_the_latest_arrival_and_recomputes_it():
    s = Scheduler(BlockManager(4, BS), max_batch_size=8, token_budget=64)
    first, second = request("first", [1, 2, 3, 4, 5, 6, 7]), request("second", [9, 8, 7, 6, 5, 4, 3])
    s.add(first)
    s.add(second)
    step(s)
    step(s)                                             # 8 tokens computed each: 2 blocks each, all 4 used
    out = s.schedule()                                  # first's 9th token needs a 5th block
    assert out.preempted == [second] and second.status is Status.WAITING
    assert second.num_computed_tokens == 0 and second.block_ids == [] and second.num_preemptions == 1
    assert [x.request for x in out.scheduled] == [first]


def test_priority_decides_the_victim_before_arrival():
    s = Scheduler(BlockManager(4, BS), max_batch_size=8, token_budget=64)
    urgent, relaxed = request("urgent", [1] * 7, priority=-1), request("relaxed", [2] * 7, priority=3)
    s.add(relaxed)
    s.add(urgent)                                       # arrives later, goes first
    step(s)
    step(s)
    assert s.schedule().preempted == [relaxed]


def test_a_shared_prefix_is_claimed_from_the_cache_and_counted():
    blocks = BlockManager(16, BS, enable_prefix_caching=True)
    s = Scheduler(blocks, max_batch_size=8, token_budget=64)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12]                # two full blocks
    s.add(request("one", prefix + [1, 2], max_new=1))
    step(s)                                             # prefills, samples its one token, finishes
    assert blocks.num_free_blocks == 16                 # freed, but its full blocks stay cached
    two = request("two", prefix + [3], max_new=1)
    s.add(two)
    assert step(s) == {"two": 1}                        # only the token after the cached 8
    assert two.num_cached_tokens == 8 and blocks.hit_tokens == 8
    assert blocks.queried_tokens == 10 + 9


def test_a_verify_row_keeps_only_the_accepted_tokens():
    """A drafted row of 1 + 3 tokens with 1 draft accepted: the token after it is the model's, and
    the cache counts the last token + the accepted draft, not the rejected ones."""
    from quantserve.engine.scheduler import ScheduledRequest, SchedulerOutput
    from quantserve.engine.speculative import NgramProposer

    proposer = NgramProposer(num_tokens=3, n_max=4, n_min=1, max_decoding_rows=4)
    s = Scheduler(BlockManager(16, BS), max_batch_size=8, token_budget=64, proposer=proposer)
    r = request("r", [1, 2, 3, 4, 5])
    s.add(r)
    step(s, token=6)                                    # 5 prompt tokens computed, 6 sampled
    s.blocks.allocate(r, r.num_computed_tokens + 4)
    row = ScheduledRequest(r, 1, draft=[7, 8, 9])
    s.update(SchedulerOutput([row], []), {"r": [7, 42]})      # 7 accepted, then the model's 42
    assert r.output_token_ids == [6, 7, 42]
    assert r.num_computed_tokens == 5 + 1 + 1           # token 6 and the accepted 7; 42 not yet
    assert (proposer.num_drafts, proposer.num_draft_tokens, proposer.num_accepted_tokens) == (1, 3, 1)


# ---- the sampler ------------------------------------------------------------------------------

def sampling_request(output: list[int] = (), prompt: list[int] = (0,), **params) -> Request:
    r = request("s", list(prompt), **params)
    r.output_token_ids = list(output)
    return r


def test_top_k_top_p_and_min_p_keep_the_hand_worked_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    keep = lambda **p: (sampler.filtered_probs(logits, [sampling_request(temperature=1.0, **p)]) > 0)  # noqa: E731
    assert keep(top_k=2).tolist() == [[True, True, False, False]]
    assert keep(top_p=0.7).tolist() == [[True, True, False, False]]     # 0.5 + 0.25 reaches 0.7
    assert keep(top_p=0.5).tolist() == [[True, False, False, False]]
    assert keep(min_p=0.4).tolist() == [[True, True, False, False]]     # under 0.4 x 0.5 = 0.2 goes
    probs = sampler.filtered_probs(logits, [sampling_request(temperature=1.0, top_k=2)])
    assert torch.allclose(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))


def test_temperature_sharpens_as_hand_worked():
    logits = torch.tensor([[2.0, 1.0]])
    probs = sampler.filtered_probs(logits, [sampling_request(temperature=0.5)])
    expected = math.exp(4) / (math.exp(4) + math.exp(2))
    assert probs[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_penalties_as_hand_worked():
    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    r = sampling_request(output=[3, 3, 2], prompt=[1], repetition_penalty=2.0, presence_penalty=0.5,
                         frequency_penalty=0.25)
    got = sampler.penalise_row(row.clone(), r)
    # repetition over prompt + output {1, 2, 3}: 2.0 kept; -1 -> -2; 0.5 -> 0.25; 3 -> 1.5;
    # then output counts {3: 2, 2: 1}: 3 loses 0.5 + 2 x 0.25, 2 loses 0.5 + 0.25
    assert got.tolist() == pytest.approx([2.0, -2.0, 0.25 - 0.75, 1.5 - 1.0])


def test_min_new_tokens_forbids_eos_and_greedy_takes_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    early = sampling_request(eos_token_ids=(1,), min_new_tokens=2)
    assert sampler.sample(logits, [early]) == [2]                        # EOS masked before 2 tokens
    done = sampling_request(output=[0, 0], eos_token_ids=(1,), min_new_tokens=2)
    assert sampler.sample(logits, [done]) == [1]


def test_a_seeded_draw_does_not_depend_on_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = sampler.sample(logits[1:2], [sampling_request(temperature=1.0, seed=11)])
    batch = [sampling_request(temperature=1.0, seed=s) for s in (3, 11, 5)]
    assert sampler.sample(logits, batch)[1] == alone[0]
