"""pipeline(): prompts, chat templates, streaming, stop strings, detokenization, errors."""
from __future__ import annotations

import pytest

from quantserve import EngineConfig, GenerationConfig, pipeline
from quantserve.engine.engine import RequestError
from quantserve.config import ConfigError
from quantserve.text import TextStream

GREEDY = GenerationConfig(max_new_tokens=20)


@pytest.fixture(scope="module")
def pipe(tiny_chat_model):
    return pipeline(str(tiny_chat_model), EngineConfig(dtype="float32", session_len=256, cache_block_seq_len=16),
                    progress=False)


def test_batch_and_single(pipe):
    outs = pipe(["Hi", "Tell me a story"], gen_config=GREEDY)
    assert [o.index for o in outs] == [0, 1]
    single = pipe("Hi", gen_config=GREEDY)
    assert single.token_ids == outs[0].token_ids and single.text == outs[0].text
    assert single.generate_token_len == len(single.token_ids) > 0
    assert single.finish_reason in ("stop", "length")


def test_text_is_decoded_token_ids(pipe):
    out = pipe("Hello", gen_config=GenerationConfig(max_new_tokens=30, ignore_eos=True))
    assert out.text == pipe.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length" and len(out.token_ids) == 30


def test_messages_and_raw_prompts(pipe):
    messages = [{"role": "user", "content": "Hi"}]
    assert pipe(messages, gen_config=GREEDY).token_ids == pipe("Hi", gen_config=GREEDY).token_ids
    raw = pipe("Hi", gen_config=GREEDY, do_preprocess=False)
    assert raw.input_token_len < pipe("Hi", gen_config=GREEDY).input_token_len


def test_stream_concatenates_to_batch_output(pipe):
    prompts = ["Hi", "Paris"]
    full = pipe(prompts, gen_config=GREEDY)
    texts = ["", ""]
    for chunk in pipe.stream_infer(prompts, gen_config=GREEDY):
        texts[chunk.index] += chunk.text
    assert texts == [o.text for o in full]


def test_stop_words_cut_text(pipe):
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    free = pipe("Hello", gen_config=cfg).text
    assert len(free) > 6
    stop = free[3:6]
    out = pipe("Hello", gen_config=GenerationConfig(max_new_tokens=40, ignore_eos=True, stop_words=[stop]))
    assert out.text == free[:free.index(stop)]
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0)])
def test_nonsense_sampling_values(kwargs):
    with pytest.raises(ConfigError):
        GenerationConfig(**kwargs)


def test_bad_prompts_then_keeps_serving(pipe):
    with pytest.raises(RequestError, match="empty"):
        pipe("", gen_config=GREEDY)
    with pytest.raises(RequestError, match="session length"):
        pipe("Paris " * 400, gen_config=GREEDY)
    assert pipe("Hi", gen_config=GREEDY).generate_token_len > 0
    assert not pipe.engine.requests


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError):
        pipeline("/nonexistent/model", progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="unsupported architecture 'gpt_neox'.*llama"):
        pipeline(str(tmp_path), progress=False)


def test_text_stream_never_emits_broken_utf8(pipe):
    text = "日本語 ✓ ünï"
    ids = pipe.tokenizer.hf.encode(text, add_special_tokens=False)
    stream = TextStream(pipe.tokenizer, [], None)
    pieces = [stream.add([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.add([], final=True) == text


def test_stop_string_across_tokens_is_held_back(pipe):
    ids = pipe.tokenizer.hf.encode("The capital of France is Paris.", add_special_tokens=False)
    stream = TextStream(pipe.tokenizer, [], ["France is"])
    emitted = "".join(stream.add([i]) for i in ids)
    assert stream.stopped and emitted == "The capital of "


def test_interleaved_streams_do_not_hang(pipe):
    """Another call stepping the same engine may finish this stream's request."""
    stream = pipe.stream_infer("Hi", gen_config=GREEDY)
    first = next(stream)
    other = pipe("Paris", gen_config=GREEDY)
    rest = list(stream)
    text = first.text + "".join(c.text for c in rest)
    assert text == pipe("Hi", gen_config=GREEDY).text and rest[-1].finish_reason
    assert other.generate_token_len > 0


def test_out_of_vocab_stop_token_ids_rejected(pipe):
    with pytest.raises(RequestError, match="stop token ids"):
        pipe("Hi", gen_config=GenerationConfig(stop_token_ids=[10**6], min_new_tokens=2))
    assert pipe("Hi", gen_config=GREEDY).generate_token_len > 0


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from quantserve.cli.args import generation_config
    from quantserve.cli.main import build_parser

    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.2, "top_p": 0.9}')
    defaults = GenerationConfig.from_model(tmp_path, temperature=0.7)
    assert (defaults.do_sample, defaults.temperature, defaults.top_p) == (True, 0.2, 0.9)
    assert GenerationConfig.from_model(tmp_path / "missing", temperature=0.7).temperature == 0.7
    ns = build_parser().parse_args(["chat", "--temperature", "0", "--top_k", "5"])
    cfg = generation_config(ns, defaults)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (False, 0.0, 0.9, 5)
