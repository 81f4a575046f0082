"""Speculative decoding with n-gram drafts: outputs as without it (greedy token for token, sampled
in distribution), stop conditions exact, the counters in /metrics, the flags."""
from __future__ import annotations

import httpx
import pytest
import torch

from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine
from quantserve.engine.request import Request
from quantserve.engine.speculative import lookup, verify
from test_engine import make_engine, run

# prompts that repeat themselves, so a random model's continuations loop and drafts get accepted
PROMPTS = [list(range(5, 40)) * 3, [7, 8, 9, 10] * 10, list(range(100, 130)) + list(range(100, 120)), [3],
           [50, 51, 52, 53, 54, 60, 61, 50, 51, 52, 53, 54, 60, 61, 50, 51]]


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return make_engine(tiny_llama)


@pytest.fixture(scope="module")
def spec(tiny_llama):
    return make_engine(tiny_llama, speculative="ngram", num_speculative_tokens=4)


def test_lookup_takes_the_longest_suffix_latest_occurrence():
    assert lookup([1, 2, 3, 9, 2, 3, 7, 8, 1, 2, 3], 3, 3, 1) == [9, 2, 3]     # "1 2 3" beats the later "2 3"
    assert lookup([5, 2, 3, 9, 2, 3, 7, 8, 2, 3], 2, 3, 1) == [7, 8]           # latest "2 3"
    assert lookup([1, 2, 3, 4], 2, 3, 1) == []                                 # nothing repeats
    assert lookup([4, 5, 4], 4, 3, 2) == []                                    # a 1-gram match is below the min
    assert lookup([4, 5, 4], 4, 3, 1) == [5, 4]                                # the draft stops at the end


def test_greedy_identical_alone_and_batched(plain, spec):
    params = SamplingParams(max_new_tokens=40)
    expected = run(plain, PROMPTS, params)
    accepted = spec.stats().spec_num_accepted_tokens
    assert [run(spec, [p], params)[0] for p in PROMPTS] == expected
    assert run(spec, PROMPTS[:4], params) == expected[:4]          # 4 decoding rows: still drafting
    stats = spec.stats()
    assert stats.spec_num_accepted_tokens - accepted > 40 and stats.spec_num_drafts > 0
    assert stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens
    assert spec.scheduler.blocks.num_free_blocks == spec.plan.num_blocks


def test_drafts_off_above_the_batch_threshold(tiny_llama, plain):
    engine = make_engine(tiny_llama, speculative="ngram", speculative_disable_by_batch_size=3)
    params = SamplingParams(max_new_tokens=12)
    assert run(engine, PROMPTS[:4], params) == run(plain, PROMPTS[:4], params)
    assert engine.stats().spec_num_drafts == 0                     # 4 rows decode together throughout


def test_stop_tokens_and_max_tokens_mid_acceptance(plain, spec):
    full = run(plain, [PROMPTS[1]], SamplingParams(max_new_tokens=30))[0]
    for stop in dict.fromkeys(full[5:15]):                         # inside the accepted runs of a loop
        for field in ("stop_token_ids", "eos_token_ids"):
            params = SamplingParams(max_new_tokens=30, **{field: (stop,)})
            want = full[:full.index(stop) + 1]
            assert run(spec, [PROMPTS[1]], params)[0] == want
    for n in range(1, 12):
        assert run(spec, [PROMPTS[1]], SamplingParams(max_new_tokens=n))[0] == full[:n]
    late = SamplingParams(max_new_tokens=30, stop_token_ids=(full[2],), min_new_tokens=9)
    assert run(spec, [PROMPTS[1]], late)[0] == run(plain, [PROMPTS[1]], late)[0]


def test_session_length_reached_mid_draft(tiny_llama):
    prompt = [7, 8, 9, 10] * 10
    want = run(make_engine(tiny_llama, session_len=50), [prompt], SamplingParams(max_new_tokens=100))[0]
    engine = make_engine(tiny_llama, session_len=50, speculative="ngram")
    assert run(engine, [prompt], SamplingParams(max_new_tokens=100))[0] == want and len(want) == 10


def test_prefix_cache_holds_only_accepted_tokens(tiny_llama):
    """A continuation of a finished request reuses its cached blocks (generated tokens included):
    K/V written for rejected drafts must not be in them."""
    params = SamplingParams(max_new_tokens=45)
    cached = make_engine(tiny_llama, speculative="ngram", enable_prefix_caching=True)
    first = run(cached, [PROMPTS[2]], params)[0]
    follow = PROMPTS[2] + first
    got = run(cached, [follow], params)[0]
    assert cached.stats().prefix_hit_tokens >= 64
    assert first + got == run(make_engine(tiny_llama), [PROMPTS[2]], SamplingParams(max_new_tokens=90))[0]
    assert cached.stats().spec_num_draft_tokens > cached.stats().spec_num_accepted_tokens > 0   # some rejected


def test_requests_that_need_per_position_state_do_not_draft(tiny_llama, plain):
    """Logprobs and penalties are not speculated: same output as without, no drafts."""
    engine = make_engine(tiny_llama, speculative="ngram")
    for params in (SamplingParams(max_new_tokens=16, logprobs=2), SamplingParams(max_new_tokens=16, presence_penalty=0.5),
                   SamplingParams(max_new_tokens=16, repetition_penalty=1.3)):
        assert run(engine, PROMPTS[:2], params) == run(plain, PROMPTS[:2], params)
    assert engine.stats().spec_num_drafts == 0


def test_logit_bias_is_speculated(tiny_llama, plain):
    engine = make_engine(tiny_llama, speculative="ngram")
    params = SamplingParams(max_new_tokens=20, logit_bias=((9, 3.0), (10, 2.0)))
    assert run(engine, PROMPTS[:2], params) == run(plain, PROMPTS[:2], params)
    assert engine.stats().spec_num_accepted_tokens > 0


# ---- sampling ---------------------------------------------------------------------------------

CRITICAL_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
                11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}


def chi_square(observed: dict, expected: dict) -> tuple[float, int]:
    """Pearson's statistic of counts against expected counts; cells expecting < 5 are pooled."""
    small = [k for k in expected if expected[k] < 5]
    obs = {k: v for k, v in observed.items() if k not in small}
    exp = {k: v for k, v in expected.items() if k not in small}
    if small:
        obs["rest"] = sum(observed.get(k, 0) for k in small)
        exp["rest"] = sum(expected[k] for k in small)
    return sum((obs.get(k, 0) - e) ** 2 / e for k, e in exp.items()), len(exp) - 1


def test_rejection_rule_keeps_the_target_distribution():
    """verify() against the exact distributions: the first token ~ p0, the next, after an accepted
    draft, ~ p1, whether the draft is likely or not."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.5, -0.5, 1.0, 0.3]])
    p = logits.softmax(dim=-1)
    n = 20000
    for draft in (1, 4):
        request = Request("x", [1], SamplingParams(temperature=1.0, seed=draft), 100)
        firsts, seconds = {}, {}
        for _ in range(n):
            out = verify(logits, request, [draft])
            firsts[out[0]] = firsts.get(out[0], 0) + 1
            if len(out) == 2:
                seconds[out[1]] = seconds.get(out[1], 0) + 1
        stat, df = chi_square(firsts, {t: n * float(p[0, t]) for t in range(5)})
        assert stat < CRITICAL_001[df], (draft, firsts)
        m = sum(seconds.values())
        assert m == firsts.get(draft, 0)                 # a second token exactly when the draft is accepted
        stat, df = chi_square(seconds, {t: m * float(p[1, t]) for t in range(5)})
        assert stat < CRITICAL_001[df], (draft, seconds)


def test_sampled_first_tokens_distributed_as_without(tiny_llama):
    """The first two sampled tokens over many seeds, with and without drafts: one distribution
    (two-sample chi-square, total variation). Logit biases concentrate the tiny model on 3 tokens
    that the prompt repeats, so drafts are sometimes accepted and sometimes not."""
    a, b, c = 40, 41, 42
    prompt = [a, b, c, a, c, b, b, a, c, c, a, b] * 2
    seeds = range(1500)

    def pairs(**kw) -> tuple[dict, Engine]:
        engine = make_engine(tiny_llama, max_batch_size=64, **kw)
        params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, logit_bias=((a, 9.0), (b, 8.0), (c, 7.5)))
                  for s in seeds]
        counts: dict = {}
        for out in run(engine, [prompt] * len(seeds), params):
            counts[tuple(out[:2])] = counts.get(tuple(out[:2]), 0) + 1
        return counts, engine

    without, _ = pairs()
    with_drafts, engine = pairs(speculative="ngram", speculative_disable_by_batch_size=64)
    stats = engine.stats()
    assert stats.spec_num_drafts > 1000 and 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert_same_distribution(without, with_drafts, len(seeds))


def assert_same_distribution(a: dict, b: dict, n: int) -> None:
    """Two samples of n outcomes each (counts by outcome): one distribution, by a two-sample
    chi-square at 0.001 and a total variation under 0.06."""
    cells = set(a) | set(b)
    total = {k: a.get(k, 0) + b.get(k, 0) for k in cells}
    stat = sum(chi_square(counts, {k: total[k] / 2 for k in cells})[0] for counts in (a, b))
    df = chi_square(a, {k: total[k] / 2 for k in cells})[1]
    assert stat < CRITICAL_001[df], (a, b)
    tv = sum(abs(a.get(k, 0) - b.get(k, 0)) for k in cells) / 2 / n
    assert tv < 0.06, tv


def test_seeds_reproducible_with_drafts(spec):
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, seed=7 + i) for i in range(3)]
    first = run(spec, PROMPTS[:3], params)
    assert run(spec, PROMPTS[:3], params) == first
    assert len({tuple(o) for o in first}) == 3


# ---- flags and metrics ------------------------------------------------------------------------

def test_serve_flags_reach_the_engine_config(tiny_llama):
    from quantserve.cli.args import engine_config
    from quantserve.cli.main import build_parser
    from quantserve.config import ConfigError

    ns = build_parser().parse_args(["serve", "api_server", str(tiny_llama), "--speculative", "ngram",
                                    "--num-speculative-tokens", "4", "--prompt-lookup-max", "3"])
    cfg = engine_config(ns)
    assert (cfg.speculative, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 4, 3)
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        EngineConfig(speculative="ngram", prompt_lookup_min=5, prompt_lookup_max=3)


def test_metrics_count_drafts_through_a_real_server(tiny_server_model):
    from conftest import RunningServer

    config = EngineConfig(dtype="float32", cache_max_tokens=4096, max_batch_size=16, speculative="ngram")
    server = RunningServer(tiny_server_model, engine_config=config)
    try:
        reply = server.client().completions.create(model="tiny", prompt="def f(x): return x * 2\n" * 6,
                                                   max_tokens=40, temperature=0)
        assert reply.choices[0].text
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.close()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode")}
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert values["vllm:spec_decode_num_draft_tokens_total"] >= values["vllm:spec_decode_num_accepted_tokens_total"] > 0


@pytest.mark.parametrize("dtype, quant_policy", [("float32", 8), ("float32", 4), ("bfloat16", 0)])
def test_greedy_identical_with_rounded_caches(tiny_llama, dtype, quant_policy):
    """A verify row reads its context as stored (rounded or quantized), as the decode it replaces
    does; bfloat16 also runs the fused one-call decode step without drafts."""
    params = SamplingParams(max_new_tokens=30)
    plain = make_engine(tiny_llama, dtype=dtype, quant_policy=quant_policy)
    spec = make_engine(tiny_llama, dtype=dtype, quant_policy=quant_policy, speculative="ngram")
    assert run(spec, PROMPTS[:4], params) == run(plain, PROMPTS[:4], params)
    assert spec.stats().spec_num_accepted_tokens > 0
