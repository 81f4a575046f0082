"""Speculative decoding with a draft model: outputs as without it (greedy token for token, sampled
in distribution) whether the draft agrees always, often or rarely; its cache caught up across
preemption, prefix-cache hits, long prompts and the session's end; the flags; vocabulary checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantserve.config import ConfigError, EngineConfig, SamplingParams
from quantserve.engine.request import Request
from test_engine import make_engine, run
from test_speculative import PROMPTS, assert_same_distribution

SPEC = dict(speculative_model=None, num_speculative_tokens=4, draft_p_min=0.0)


@pytest.fixture(scope="module")
def sibling(tiny_llama, tmp_path_factory):
    """A smaller, noisier sibling: the first half of the layers, every weight perturbed; it
    agrees with the model on some tokens and not on others."""
    out = tmp_path_factory.mktemp("draft") / "sibling"
    shutil.copytree(tiny_llama, out)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    keep = cfg["num_hidden_layers"] // 2
    generator = torch.Generator().manual_seed(3)
    weights = {}
    for name, w in load_file(tiny_llama / "model.safetensors").items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= keep:
            continue
        noise = torch.randn(w.shape, generator=generator) * w.float().std() * 0.3
        weights[name] = (w.float() + noise).to(w.dtype) if w.dim() > 1 else w
    save_file(weights, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": keep}))
    return out


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return make_engine(tiny_llama)


def drafted(model_dir, draft_dir, **kw):
    return make_engine(model_dir, **{**SPEC, "speculative_model": str(draft_dir), **kw})


@pytest.mark.parametrize("draft", ["self", "sibling"])
def test_greedy_identical_alone_and_batched(tiny_llama, sibling, plain, draft):
    engine = drafted(tiny_llama, tiny_llama if draft == "self" else sibling)
    params = SamplingParams(max_new_tokens=40)
    expected = run(plain, PROMPTS, params)
    assert [run(engine, [p], params)[0] for p in PROMPTS] == expected
    assert run(engine, PROMPTS[:4], params) == expected[:4]
    s = engine.stats()
    assert s.spec_num_drafts > 0 and s.spec_num_draft_tokens >= s.spec_num_accepted_tokens > 0
    if draft == "self":                               # the model drafting for itself: all accepted
        assert s.spec_num_accepted_tokens == s.spec_num_draft_tokens
    else:
        assert s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert engine.scheduler.blocks.num_free_blocks == engine.plan.num_blocks


def test_stops_and_max_tokens_inside_accepted_drafts(tiny_llama, plain):
    engine = drafted(tiny_llama, tiny_llama)
    full = run(plain, [PROMPTS[0]], SamplingParams(max_new_tokens=30))[0]
    for stop in dict.fromkeys(full[3:12]):
        assert run(engine, [PROMPTS[0]], SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)))[0] \
            == full[:full.index(stop) + 1]
    for n in range(1, 10):
        assert run(engine, [PROMPTS[0]], SamplingParams(max_new_tokens=n))[0] == full[:n]


def test_session_end_preemption_and_prefix_hits(tiny_llama, sibling):
    """The draft's cache is rebuilt after a preemption (new blocks) and caught up from zero over a
    prefix-cache hit, and never written past the session."""
    params = SamplingParams(max_new_tokens=100)
    prompt = [7, 8, 9, 10] * 10
    want = run(make_engine(tiny_llama, session_len=50), [prompt], params)[0]
    assert run(drafted(tiny_llama, sibling, session_len=50), [prompt], params)[0] == want and len(want) == 10

    params = SamplingParams(max_new_tokens=60)
    want = run(make_engine(tiny_llama), PROMPTS[1:], params)
    tight = drafted(tiny_llama, sibling, session_len=128, cache_max_tokens=192, max_batch_size=4)
    requests = [tight.add_request(f"r{i}", p, params) for i, p in enumerate(PROMPTS[1:])]
    while tight.has_work:
        tight.step()
    assert [r.output_token_ids for r in requests] == want and sum(r.num_preemptions for r in requests) > 0

    cached = drafted(tiny_llama, sibling, enable_prefix_caching=True)
    first = run(cached, [PROMPTS[2]], SamplingParams(max_new_tokens=45))[0]
    got = run(cached, [PROMPTS[2] + first], SamplingParams(max_new_tokens=45))[0]
    assert cached.stats().prefix_hit_tokens >= 64
    assert first + got == run(make_engine(tiny_llama), [PROMPTS[2]], SamplingParams(max_new_tokens=90))[0]


def test_long_prompt_catches_up_over_steps(tiny_llama, plain):
    """A prompt longer than the step's token budget: the draft model reads it a chunk a step."""
    prompt = list(range(3, 90)) + list(range(3, 40))
    params = SamplingParams(max_new_tokens=30)
    engine = drafted(tiny_llama, tiny_llama, max_prefill_token_num=32)
    assert run(engine, [prompt], params) == run(plain, [prompt], params)
    assert engine.stats().spec_num_accepted_tokens > 0


def test_confidence_floor_shortens_drafts(tiny_llama, sibling):
    """No floor: K tokens a draft (room allowing). A floor above what the (near uniform) random
    draft model ever gives: no drafts, same output. A floor between: each request's draft stops
    at its first token below it, hand-worked on fabricated logits."""
    params = SamplingParams(max_new_tokens=40)
    loose, strict = drafted(tiny_llama, sibling), drafted(tiny_llama, sibling, draft_p_min=0.5)
    assert run(loose, PROMPTS[:3], params) == run(strict, PROMPTS[:3], params)
    a, b = loose.stats(), strict.stats()
    assert a.spec_num_draft_tokens / a.spec_num_drafts > 3.5        # K, but where the room is less
    assert b.spec_num_draft_tokens == 0

    proposer = strict.scheduler.proposer
    request = Request("x", [1], SamplingParams(), 100)
    batch = [(request, 4), (request, 4), (request, 2)]
    drafts = [[], [7], [5]]
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.05, 0.9, 0.05]]))
    going = proposer._extend([0, 1, 2], logits, batch, drafts)
    assert drafts == [[0], [7], [5, 1]]       # 0.6 >= 0.5 kept; 0.4 < 0.5 stops; 0.9 kept, room 2 reached
    assert going == [0]


def test_sampled_tokens_distributed_as_without(tiny_llama, sibling):
    """The first two sampled tokens over many seeds, with and without a draft model: one
    distribution (two-sample chi-square, total variation). The logit biases concentrate the tiny
    model on 3 tokens; the draft model sees them too, so it is accepted sometimes, not always."""
    a, b, c = 40, 41, 42
    prompt = [a, b, c, a, c, b, b, a, c, c, a, b] * 2
    seeds = range(1200)
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, logit_bias=((a, 9.0), (b, 8.0), (c, 7.5)))
              for s in seeds]

    def pairs(engine) -> dict:
        counts: dict = {}
        for out in run(engine, [prompt] * len(seeds), params):
            key = tuple(t if t in (a, b, c) else -1 for t in out[:2])     # the rare tokens as one cell
            counts[key] = counts.get(key, 0) + 1
        return counts

    without = pairs(make_engine(tiny_llama, max_batch_size=64))
    engine = drafted(tiny_llama, sibling, max_batch_size=64, speculative_disable_by_batch_size=64)
    with_drafts = pairs(engine)
    s = engine.stats()
    assert s.spec_num_drafts > 1000 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert_same_distribution(without, with_drafts, len(seeds))


def test_memory_table_counts_the_draft(tiny_llama, sibling, plain):
    engine = drafted(tiny_llama, sibling)
    assert engine.weights_bytes > plain.weights_bytes and engine.kv_bytes > plain.kv_bytes
    assert "draft model" in engine.memory_summary()


def test_another_vocabulary_is_refused(tiny_chat_model, tmp_path):
    other = shutil.copytree(tiny_chat_model, tmp_path / "other")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]                       # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="vocabulary"):
        drafted(tiny_chat_model, other)
    drafted(tiny_chat_model, tiny_chat_model)                   # its own vocabulary: fine


def test_flags_reach_the_engine_config(tiny_llama):
    from quantserve.cli.args import engine_config
    from quantserve.cli.main import build_parser

    parse = lambda *flags: engine_config(build_parser().parse_args(["serve", "api_server", str(tiny_llama), *flags]))  # noqa: E731
    cfg = parse("--speculative-model", "/d", "--num-speculative-tokens", "6", "--draft-p-min", "0.5")
    assert (cfg.speculative, cfg.speculative_model, cfg.num_speculative_tokens, cfg.draft_p_min) == \
        ("draft_model", "/d", 6, 0.5)
    assert parse("--model-draft", "/d").speculative == "draft_model"
    cfg = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}')
    assert (cfg.speculative, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 3, 2)
    assert parse("--speculative-config", '{"model": "/d"}').speculative == "draft_model"
    for bad, message in (({"speculative": "draft_model"}, "speculative_model"),
                         ({"speculative": "ngram", "speculative_model": "/d"}, "speculative_model"),
                         ({"speculative_config": {"modle": "/d"}}, "unknown keys"),
                         ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2.5}}, "must be an integer"),
                         ({"speculative_config": {"model": 3}}, "must be a string"),
                         ({"speculative_model": "/d", "draft_p_min": 1.5}, "draft_p_min")):
        with pytest.raises(ConfigError, match=message):
            EngineConfig(**bad)


def test_a_real_server_with_a_draft_model(tiny_server_model):
    """Through the official client: the same greedy text as a server without a draft, and the
    drafts counted in /metrics."""
    import httpx

    from conftest import RunningServer

    texts, metrics = [], ""
    for draft in (None, str(tiny_server_model)):
        config = EngineConfig(dtype="float32", cache_max_tokens=4096, max_batch_size=8, speculative_model=draft,
                              draft_p_min=0.0)
        server = RunningServer(tiny_server_model, engine_config=config)
        try:
            reply = server.client().completions.create(model="tiny", prompt="def f(x): return x * 2\n" * 4,
                                                       max_tokens=32, temperature=0)
            texts.append(reply.choices[0].text)
            metrics = httpx.get(server.url + "/metrics").text
            info = httpx.get(server.url + "/info").json()
            assert (info["speculative"] or "").startswith("draft model" if draft else "")
        finally:
            server.close()
    assert texts[0] == texts[1] and texts[0]
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode")}
    assert values["vllm:spec_decode_num_accepted_tokens_total"] == values["vllm:spec_decode_num_draft_tokens_total"] > 0


def test_ids_past_the_draft_vocabulary_skip_drafting(tiny_llama, tmp_path, plain):
    """A draft model with a smaller vocabulary (as a smaller sibling's may be): a request holding an
    id it has no row for decodes without drafts; the others in its batch still draft."""
    out = shutil.copytree(tiny_llama, tmp_path / "small_vocab")
    cfg = json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = weights[name][:300].contiguous()
    save_file(weights, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    engine = drafted(tiny_llama, out)
    prompts = [PROMPTS[1] + [310], PROMPTS[0]]
    params = SamplingParams(max_new_tokens=20)
    assert run(engine, prompts, params) == run(plain, prompts, params)
    assert engine.stats().spec_num_drafts > 0


def test_the_servers_memory_check_counts_the_draft(tiny_llama, sibling, monkeypatch):
    """With room for the model's weights and cache but not the draft's too, the load is refused
    before anything is allocated, and the message says the draft counted."""
    from quantserve.kvcache import budget
    from quantserve.serve.server import check_memory, model_bytes

    config = EngineConfig(dtype="float32", cache_max_tokens=1024, speculative_model=str(sibling))
    weights, per_token = model_bytes(tiny_llama, config, 0)
    monkeypatch.setattr(budget, "free_memory", lambda device: weights + 1024 * per_token + 1)
    check_memory(tiny_llama, config)                                   # the model alone fits
    with pytest.raises(MemoryError, match="draft model"):
        check_memory(tiny_llama, config, sibling)
