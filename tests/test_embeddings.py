"""/v1/embeddings, /v1/rerank and /v1/score through a real server and the official openai client,
checked against sentence-transformers (all-MiniLM-L6-v2, a real model shipped offline in a PyPI
package), transformers' hidden states (a tiny random decoder) and a cross-encoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import anthropic
import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import RunningServer

SENTENCES = [
    "The cat sits on the mat.", "A quantized model runs on the CPU you already have.", "Paris is the capital of France.",
    "Embeddings map text to vectors.", "hi", "The quick brown fox jumps over the lazy dog.",
    "Rust and C++ are systems programming languages.", "Le chat est sur le tapis.", "Dogs are loyal animals.",
    "How do I install the package?", "The stock market fell sharply on Monday.", "Photosynthesis turns light into sugar.",
    "She sells sea shells by the sea shore.", "A mixture of experts routes each token.", "SELECT * FROM users;",
    "The meeting is moved to Thursday at 3 pm.", "Water boils at 100 degrees Celsius at sea level.",
    "Ünïcode têxt wörks tøø — 日本語もある", "Attention is all you need.", "The library opens at nine.",
    "Please reset my password.", "Black holes bend light.", "I love this song!", "It rained all weekend.",
    "The train to Berlin leaves from platform 4.", "A long sentence " + "that keeps going " * 30,
    "Numbers like 3.14159 and 2.71828 are constants.", "Gradient descent minimizes a loss.",
    "The museum has a new exhibit on Egypt.", "Can you recommend a good book?", "Mountains are cold at the top.",
    "The function returns None when the list is empty.",
]


@pytest.fixture(scope="module")
def minilm_server(minilm_dir):
    server = RunningServer(minilm_dir, model_name="minilm")
    yield server
    server.close()


def reference_embeddings(model_dir: Path, sentences: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(sentences, convert_to_numpy=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_matches_sentence_transformers_on_32_sentences(minilm_server, minilm_dir):
    client = minilm_server.client()
    got = client.embeddings.create(model="minilm", input=SENTENCES)              # the client asks for base64
    ours = np.array([d.embedding for d in got.data])
    ref = reference_embeddings(minilm_dir, SENTENCES)
    assert ours.shape == ref.shape == (32, 384)
    assert cosines(ours, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)            # its Normalize module
    assert [d.index for d in got.data] == list(range(32))
    tokens = sum(len(t) for t in minilm_server.state.service.model.tokenizer.hf(SENTENCES)["input_ids"])
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens


def test_float_format_token_ids_and_one_string_agree(minilm_server):
    client = minilm_server.client()
    text = "Paris is the capital of France."
    as_float = httpx.post(minilm_server.url + "/v1/embeddings", json={"input": text, "encoding_format": "float"}).json()
    vec = np.array(as_float["data"][0]["embedding"], dtype=np.float32)
    ids = minilm_server.state.service.model.tokenizer.hf.encode(text)
    by_ids = client.embeddings.create(model="minilm", input=ids).data[0].embedding
    assert np.allclose(vec, by_ids, atol=1e-6)
    assert as_float["object"] == "list" and as_float["model"] == "minilm"


def test_models_card_says_what_it_can_do_and_chat_is_refused(minilm_server):
    client = minilm_server.client()
    card = httpx.get(minilm_server.url + "/v1/models").json()["data"][0]
    assert card["capabilities"] == ["embeddings"]
    with pytest.raises(openai.BadRequestError, match="only embeds"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only embeds"):
        client.completions.create(model="minilm", prompt="hi", stream=True)
    with pytest.raises(openai.BadRequestError, match="cannot score"):
        client.post("/rerank", body={"query": "q", "documents": ["a"]}, cast_to=object)
    claude = anthropic.Anthropic(base_url=minilm_server.url, api_key="none", max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.BadRequestError, match="only embeds"):
        claude.messages.create(model="minilm", max_tokens=4, messages=hi)
    with pytest.raises(anthropic.BadRequestError, match="only embeds"):
        claude.messages.count_tokens(model="minilm", messages=hi)


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"), ({"input": ""}, "input"), ({"input": [[]]}, "input"),
    ({"input": [10 ** 9]}, None), ({"input": "x", "dimensions": 100}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"), ({"input": "x", "bogus": 1}, "bogus"),
    ({"input": ["x"] * 3000}, "input"),
])
def test_bad_embedding_requests_are_400_and_the_server_goes_on(minilm_server, body, param):
    r = httpx.post(minilm_server.url + "/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] and error["message"]
    if param:
        assert error["param"] == param
    ok = minilm_server.client().embeddings.create(model="minilm", input="still here")
    assert len(ok.data[0].embedding) == 384


def test_long_inputs_are_truncated_as_sentence_transformers_does(minilm_server, minilm_dir):
    text = "word " * 400                        # past max_seq_length 256
    got = np.array(minilm_server.client().embeddings.create(model="minilm", input=text).data[0].embedding)
    ref = reference_embeddings(minilm_dir, [text])[0]
    assert cosines(got[None], ref[None])[0] >= 0.9999


# ---- a decoder with last-token pooling --------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_server(tiny_chat_model):
    server = RunningServer(tiny_chat_model, pooling="last")
    yield server
    server.close()


def test_decoder_last_token_pooling_matches_transformers(decoder_server, tiny_chat_model):
    from transformers import AutoModelForCausalLM

    texts = ["def f(x): return x * 2", "The capital of France is Paris.", "Héllo wörld"]
    got = np.array([d.embedding for d in decoder_server.client().embeddings.create(model="tiny", input=texts).data])
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    tok = decoder_server.state.service.model.tokenizer.hf
    with torch.inference_mode():
        ref = np.stack([torch.nn.functional.normalize(hf.model(torch.tensor([tok.encode(t)])).last_hidden_state[0, -1],
                                                      dim=0).numpy() for t in texts])
    assert cosines(got, ref).min() >= 0.9999
    card = httpx.get(decoder_server.url + "/v1/models").json()["data"][0]
    assert "embeddings" in card["capabilities"] and "chat" in card["capabilities"]


def test_decoder_embeds_while_it_generates(decoder_server):
    """Embedding requests join the generation batches; both answer."""
    import concurrent.futures as cf

    client = decoder_server.client()
    with cf.ThreadPoolExecutor(4) as pool:
        chat = pool.submit(client.chat.completions.create, model="tiny", max_tokens=24, temperature=0,
                           messages=[{"role": "user", "content": "Tell me a story"}])
        embeds = [pool.submit(client.embeddings.create, model="tiny", input=[f"text {i}"] * 3) for i in range(3)]
        assert chat.result().usage.completion_tokens > 0
        vectors = [np.array(e.result().data[0].embedding) for e in embeds]
    alone = np.array(client.embeddings.create(model="tiny", input="text 0").data[0].embedding)
    assert np.allclose(vectors[0], alone, atol=1e-5)


def test_decoder_yes_no_rerank_is_the_probability_of_yes(default_model):
    """The default model as a yes/no judge: scores equal transformers' P(yes) on the same prompt."""
    from transformers import AutoModelForCausalLM

    from quantserve.serve.embeddings import RERANK_INSTRUCTION, judge_inputs

    from quantserve.config import EngineConfig

    server = RunningServer(default_model, EngineConfig(dtype="float32", session_len=2048, cache_max_tokens=4096))
    try:
        model = server.state.service.model
        assert model.score_tokens is not None and "rerank" in model.capabilities
        docs = ["Paris is the capital of France.", "Bananas are yellow.", "France is in Europe."]
        r = httpx.post(server.url + "/v1/rerank", json={"query": "What is the capital of France?",
                                                        "documents": docs}).json()
        hf = AutoModelForCausalLM.from_pretrained(server.state.models.slots["tiny"].card["root"], dtype=torch.float32)
        yes, no = model.score_tokens
        expected = []
        for ids, _ in judge_inputs(model, ["What is the capital of France?"] * 3, docs, RERANK_INSTRUCTION):
            with torch.inference_mode():
                logits = hf(torch.tensor([ids])).logits[0, -1]
            expected.append(float(torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0]))
        got = {x["index"]: x["relevance_score"] for x in r["results"]}
        assert [x["index"] for x in r["results"]] == sorted(range(3), key=lambda i: -expected[i])
        assert np.allclose([got[i] for i in range(3)], expected, atol=2e-3)
    finally:
        server.close()


def test_a_model_without_pooling_refuses_embeddings(tiny_server):
    with pytest.raises(openai.BadRequestError, match="does not embed"):
        tiny_server.client().embeddings.create(model="tiny", input="hi")


# ---- a cross-encoder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT sequence classifier (one label) with all-MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("cross")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, out / name)
    return out


def test_cross_encoder_rerank_order_and_scores_match_sentence_transformers(cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    query = "What is the capital of France?"
    docs = SENTENCES[:12]
    ref = CrossEncoder(str(cross_encoder_dir), device="cpu").predict([(query, d) for d in docs])
    server = RunningServer(cross_encoder_dir, model_name="rr")
    try:
        body = {"model": "rr", "query": query, "documents": docs, "top_n": 5}
        r = httpx.post(server.url + "/v1/rerank", json=body).json()
        assert [x["index"] for x in r["results"]] == list(np.argsort(-ref)[:5])
        assert np.allclose([x["relevance_score"] for x in r["results"]], np.sort(ref)[::-1][:5], atol=1e-5)
        assert r["results"][0]["document"]["text"] == docs[r["results"][0]["index"]]
        score = httpx.post(server.url + "/v1/score", json={"text_1": query, "text_2": docs[:3]}).json()
        assert np.allclose([d["score"] for d in score["data"]], ref[:3], atol=1e-5)
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["capabilities"] == ["rerank", "score"]
        bad = httpx.post(server.url + "/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
        assert httpx.post(server.url + "/v1/rerank", json={"query": "q", "documents": []}).status_code == 400
        assert httpx.post(server.url + "/v1/embeddings", json={"input": "x"}).status_code == 400
    finally:
        server.close()


def test_pooling_config_is_read_from_sentence_transformers_files(tmp_path, minilm_dir):
    from quantserve.models.pooling import sentence_config

    config = sentence_config(minilm_dir)
    assert (config.kind, config.normalize, config.max_length) == ("mean", True, 256)
    shutil.copytree(minilm_dir, tmp_path / "m")
    (tmp_path / "m/1_Pooling/config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                   "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="one of mean"):
        sentence_config(tmp_path / "m")


def test_pipeline_embed_for_an_encoder_and_a_decoder(minilm_dir, tiny_chat_model):
    from quantserve import pipeline
    from quantserve.engine.engine import RequestError

    from quantserve.config import EngineConfig

    pipe = pipeline(str(minilm_dir), progress=False)
    ours = np.array(pipe.embed(SENTENCES[:8]))
    ref = reference_embeddings(minilm_dir, SENTENCES[:8])
    assert cosines(ours, ref).min() >= 0.9999
    exact = np.array(pipeline(str(minilm_dir), EngineConfig(dtype="float32"), progress=False).embed(SENTENCES[:8]))
    assert cosines(exact, ref).min() >= 0.999999                 # float32 matmuls: the same numbers
    assert np.allclose(pipe.embed(SENTENCES[0]), ours[0], atol=1e-6)
    with pytest.raises(RequestError, match="only embeds"):
        pipe("hi")
    decoder = pipeline(str(tiny_chat_model), progress=False)
    texts = ["one", "two words", "three words here"]
    batched, alone = decoder.embed(texts, pooling="mean"), [decoder.embed(t, pooling="mean") for t in texts]
    assert np.allclose(batched, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_dimensions_cut_a_matryoshka_model_and_normalize_again(minilm_dir, tmp_path):
    path = tmp_path / "mrl"
    shutil.copytree(minilm_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [128, 256, 384]}))
    server = RunningServer(path, model_name="mrl")
    try:
        client = server.client()
        full = np.array(client.embeddings.create(model="mrl", input="Paris is lovely.").data[0].embedding)
        cut = np.array(client.embeddings.create(model="mrl", input="Paris is lovely.", dimensions=128).data[0].embedding)
        assert cut.shape == (128,) and np.isclose(np.linalg.norm(cut), 1.0, atol=1e-5)
        assert np.allclose(cut, full[:128] / np.linalg.norm(full[:128]), atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="one of"):
            client.embeddings.create(model="mrl", input="x", dimensions=100)
    finally:
        server.close()
