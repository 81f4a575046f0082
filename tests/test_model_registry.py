"""Several models in one server: by name, loaded and unloaded at run time, hot-reloaded under load."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from conftest import RunningServer, add_tokenizer, build_llama

ADMIN = {"Authorization": "Bearer admin-key"}
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("two_models")
    return {name: str(add_tokenizer(build_llama(root / name, seed=seed, max_position_embeddings=1024)))
            for name, seed in (("a", 1), ("b", 2))}


def reference_text(model_dir: str, prompt: str, n: int = 8) -> str:
    """Greedy continuation by the transformers implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tok.decode(ids[0, start:])


def complete(client: openai.OpenAI, model: str) -> str:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == model
    return r.choices[0].text


@pytest.fixture
def server(two_models):
    s = RunningServer(two_models["a"], model_name="a", admin_api_keys=["admin-key"])
    yield s
    s.close()


def test_two_models_at_once_each_answers_under_its_own_name(two_models):
    from quantserve.config import ServerConfig
    from quantserve.serve.openai_app import ServerState, build_app
    from quantserve.serve.server import make_loader
    from fastapi.testclient import TestClient
    from quantserve.config import EngineConfig

    state = ServerState(ServerConfig("a"))
    state.models.loader = make_loader(EngineConfig(dtype="float32", cache_max_tokens=2048), state.config,
                                      state.metrics, progress=False)
    state.models.start([("a", two_models["a"]), ("b", two_models["b"])]).join(60)
    http = TestClient(build_app(state))
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["a", "b"]
    texts = {}
    for name in ("a", "b"):
        r = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True}).json()
        assert r["model"] == name
        texts[name] = r["choices"][0]["text"]
        assert texts[name] == reference_text(two_models[name], PROMPT)
    assert texts["a"] != texts["b"]
    metrics = http.get("/metrics").text
    assert 'vllm:num_requests_running{model_name="a"}' in metrics
    assert 'vllm:num_requests_running{model_name="b"}' in metrics
    for slot in state.models.slots.values():
        slot.service.engine.shutdown()


def test_load_and_unload_at_run_time(server, two_models):
    client = server.client()
    assert complete(client, "a") == reference_text(two_models["a"], PROMPT)
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "b")
    assert e.value.body["code"] == "model_not_found"

    r = httpx.post(server.url + "/v1/models/load", json={"model": "b", "path": two_models["b"],
                                                          "cache_max_tokens": 2048}, headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "b"
    assert {m.id for m in client.models.list().data} == {"a", "b"}
    assert complete(client, "b") == reference_text(two_models["b"], PROMPT)

    b_engine = server.state.models.slots["b"].service.engine
    r = httpx.post(server.url + "/v1/models/unload", json={"model": "b"}, headers=ADMIN, timeout=60)
    assert r.json() == {"id": "b", "object": "model", "deleted": True}
    assert not b_engine.worker.is_alive()
    assert [m.id for m in client.models.list().data] == ["a"]
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "b")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found" and "'b'" in e.value.message
    assert 'model_name="b"' not in httpx.get(server.url + "/metrics").text.split("vllm:time_to_first")[0]


def test_unload_lets_requests_already_running_finish(server, two_models):
    httpx.post(server.url + "/v1/models/load", json={"model": "b", "path": two_models["b"], "cache_max_tokens": 2048},
               headers=ADMIN, timeout=60).raise_for_status()
    stream = server.client().completions.create(model="b", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    first = next(iter(stream))
    done = threading.Event()
    unloading = threading.Thread(target=lambda: (httpx.post(server.url + "/v1/models/unload", json={"model": "b"},
                                                            headers=ADMIN, timeout=60), done.set()))
    unloading.start()
    rest = list(stream)
    unloading.join(60)
    assert done.is_set()
    assert rest[-1].choices[0].finish_reason == "length"
    assert 1 + sum(1 for c in rest if c.choices and c.choices[0].text) >= 100 and first.choices


@pytest.mark.parametrize("body, headers, status, code", [
    ({"model": "b", "path": "/nowhere"}, ADMIN, 400, "load_failed"),
    ({"model": "a", "path": "/nowhere"}, ADMIN, 409, "model_exists"),
    ({"model": "b"}, ADMIN, 400, "invalid_value"),
    ({"model": "b", "path": "/nowhere"}, {}, 401, "invalid_api_key"),
    ({"model": "b", "path": "/nowhere"}, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ({"model": "b", "path": "/nowhere", "quant_policy": 5}, ADMIN, 400, "load_failed"),
    ({"model": "", "path": "/nowhere"}, ADMIN, 400, None),
])
def test_bad_loads_are_refused_in_openais_error_shape(server, body, headers, status, code):
    r = httpx.post(server.url + "/v1/models/load", json=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["a"]


def test_a_load_that_does_not_fit_in_memory_is_refused_before_allocating(server, two_models):
    r = httpx.post(server.url + "/v1/models/load", json={"model": "b", "path": two_models["b"],
                                                          "cache_max_tokens": 10**12}, headers=ADMIN, timeout=60)
    assert r.status_code == 400 and "not enough memory" in r.json()["error"]["message"]
    for route in ("unload", "reload"):
        r = httpx.post(server.url + f"/v1/models/{route}", json={"model": "zzz"}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_model_management_is_off_without_admin_keys(two_models):
    s = RunningServer(two_models["a"], model_name="a")
    try:
        r = httpx.post(s.url + "/v1/models/load", json={"model": "b", "path": two_models["b"]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    finally:
        s.close()


def test_hot_reload_under_steady_load_fails_no_request(server, two_models):
    client = server.client(timeout=60)
    old_text, new_text = reference_text(two_models["a"], PROMPT), reference_text(two_models["b"], PROMPT)
    stop, results = threading.Event(), []

    def steady(worker: int):
        while not stop.is_set():
            if worker % 2:
                chunks = client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True})
                results.append("".join(c.choices[0].text for c in chunks if c.choices))
            else:
                results.append(complete(client, "a"))

    old_engine = server.state.models.slots["a"].service.engine
    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(steady, i) for i in range(4)]
        time.sleep(1.0)
        before = len(results)
        r = httpx.post(server.url + "/v1/models/reload", json={"model": "a", "path": two_models["b"]},
                       headers=ADMIN, timeout=120)
        assert r.status_code == 200 and r.json()["root"] == two_models["b"]
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.result()                       # a failed request would raise here
    assert before > 0 and set(results) == {old_text, new_text}
    assert results[-1] == new_text and not old_engine.worker.is_alive()


def test_a_failed_reload_keeps_the_old_weights_serving(server, two_models):
    r = httpx.post(server.url + "/v1/models/reload", json={"model": "a", "path": "/nowhere"}, headers=ADMIN, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "load_failed"
    assert complete(server.client(), "a") == reference_text(two_models["a"], PROMPT)
