"""LoRA adapters (PEFT's) over float and quantized bases, several in one batch, kept apart by the
prefix cache, served over HTTP by name. The reference is PEFT's own merge_and_unload() in
transformers (float32); every adapter's lora_B is random (PEFT starts it at zero, which would
make the adapter a no-op and these tests unable to fail)."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import add_tokenizer, build_llama, build_phi3, build_qwen2, build_qwen3, free_port, wait_healthy
from quantserve.config import EngineConfig, SamplingParams
from quantserve.engine.engine import Engine, RequestError
from quantserve.models.lora import LoRAError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADMIN = {"Authorization": "Bearer admin-key"}
PROMPT = [(7 * i) % 250 + 5 for i in range(40)]
FORCED = [(11 * i) % 250 + 3 for i in range(8)]          # the continuation every run is fed


def save_adapter(base: Path, out: Path, seed: int, targets=ALL, r: int = 8, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out)
    return out


@functools.cache
def reference(base: Path, adapter: Path | None):
    """The transformers model (float32) with the adapter merged into its weights by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def reference_logits(base: Path, adapter: Path | None, tokens: list[int], n: int) -> torch.Tensor:
    """[n, V]: the reference's logits before each of the last n tokens."""
    with torch.no_grad():
        return reference(base, adapter)(torch.tensor([tokens])).logits[0, len(tokens) - n - 1:-1]


def forced_logits(engine: Engine, runs: dict[str, str | None], n: int = len(FORCED)) -> dict[str, torch.Tensor]:
    """Every run (id -> adapter name or None) in one batch from the first step, fed PROMPT then
    FORCED whatever it samples; each run's logits [n, V] before each fed token."""
    for rid, lora in runs.items():
        engine.add_request(rid, PROMPT[:len(PROMPT) - 3 * len(engine.requests)], SamplingParams(max_new_tokens=n),
                           lora=lora)
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in runs}
    while engine.has_work:
        out = engine.scheduler.schedule()
        logits, sampled = engine.runner.compute_logits(out)
        for r, row in zip(sampled, logits):
            rows[r.request_id].append(row)
        engine.scheduler.update(out, {r.request_id: FORCED[len(r.output_token_ids)] for r in sampled})
    for r in list(engine.requests.values()):
        engine.requests.pop(r.request_id)
    return {rid: torch.stack(r) for rid, r in rows.items()}


def prompt_of(k: int) -> list[int]:
    """The k-th run's tokens in forced_logits (each is 3 tokens shorter than the one before)."""
    return PROMPT[:len(PROMPT) - 3 * k] + FORCED


def engine(model: Path, **kw) -> Engine:
    cfg = dict(dtype="float32", cache_block_seq_len=16, session_len=256, max_batch_size=8, cache_max_tokens=2048)
    return Engine(model, EngineConfig(**{**cfg, **kw}), progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny chat Llama and three adapters: a and b on every projection, c on q, v and down only."""
    root = tmp_path_factory.mktemp("lora")
    base = add_tokenizer(build_llama(root / "base", max_position_embeddings=1024))
    return {"base": base, "a": save_adapter(base, root / "a", 1), "b": save_adapter(base, root / "b", 2),
            "c": save_adapter(base, root / "c", 3, ["q_proj", "v_proj", "down_proj"])}


FAMILIES = {   # family -> (checkpoint builder, target modules, LoraConfig extras)
    "qwen2": (build_qwen2, ALL, {"use_rslora": True}),              # q/k/v biases; alpha / sqrt(r)
    "qwen3": (build_qwen3, ["k_proj", "o_proj", "up_proj"], {}),    # head_dim 32 != 64 / 4; parts alone
    "phi3": (build_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),   # fused in HF already
}


def test_adapter_matches_peft_merged_model(llama):
    e = engine(llama["base"])
    e.add_lora("a", llama["a"])
    got = forced_logits(e, {"r": "a"})["r"]
    expected = reference_logits(llama["base"], llama["a"], prompt_of(0), len(FORCED))
    base = reference_logits(llama["base"], None, prompt_of(0), len(FORCED))
    assert (expected - base).abs().max() > 0.5                     # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    greedy = e.add_request("g", PROMPT, SamplingParams(max_new_tokens=8), lora="a")
    while e.has_work:
        e.step()
    assert greedy.output_token_ids == greedy_reference(llama["base"], llama["a"], PROMPT, 8)


def greedy_reference(base: Path, adapter: Path, prompt: list[int], n: int) -> list[int]:
    out = reference(base, adapter).generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_other_families_match_peft(tmp_path, family):
    build, targets, extras = FAMILIES[family]
    base = build(tmp_path / "base")
    adapter = save_adapter(base, tmp_path / "adapter", 5, targets, **extras)
    e = engine(base)
    e.add_lora("x", adapter)
    got = forced_logits(e, {"r": "x"})["r"]
    expected = reference_logits(base, adapter, prompt_of(0), len(FORCED))
    assert (expected - reference_logits(base, None, prompt_of(0), len(FORCED))).abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)


def test_one_mixed_batch_every_row_matches_its_own_reference(llama):
    """Rows with adapter a, b, none, a again and c (partial groups) prefill and decode together;
    on the native kernels a row's logits are the same bits alone as in the mix."""
    from quantserve.kernels.native import NativeOps

    e = engine(llama["base"])
    for name in ("a", "b", "c"):
        e.add_lora(name, llama[name])
    runs = {"ra": "a", "rb": "b", "rn": None, "ra2": "a", "rc": "c"}
    got = forced_logits(e, runs)
    for k, (rid, lora) in enumerate(runs.items()):
        expected = reference_logits(llama["base"], llama[lora] if lora else None, prompt_of(k), len(FORCED))
        torch.testing.assert_close(got[rid], expected, atol=2e-4, rtol=0, msg=f"row {rid} ({lora})")
    alone = forced_logits(e, {"ra": "a"})["ra"]
    if isinstance(e.model.ops, NativeOps):
        assert torch.equal(alone, got["ra"])
    assert alone.argmax(-1).tolist() == got["ra"].argmax(-1).tolist()


@pytest.mark.parametrize("spec", [dict(speculative="ngram"), "draft"])
def test_adapter_rows_speculate_with_their_adapter(llama, spec):
    """A verify row (last token + draft) runs through its request's adapter: greedy output as
    without drafts, for rows of adapters a, b and none in one batch; the draft model (the base,
    no adapter) still drafts for them."""
    if spec == "draft":
        spec = dict(speculative_model=str(llama["base"]), draft_p_min=0.0)
    loop = [9, 10, 11, 12, 13] * 6                       # repeats itself, so n-gram drafts are found
    runs = {"ra": "a", "rb": "b", "rn": None}
    outputs = []
    for kw in ({}, spec):
        e = engine(llama["base"], **kw)
        for name in ("a", "b"):
            e.add_lora(name, llama[name])
        reqs = [e.add_request(rid, loop, SamplingParams(max_new_tokens=24), lora=lora) for rid, lora in runs.items()]
        while e.has_work:
            e.step()
        outputs.append([r.output_token_ids for r in reqs])
    assert outputs[0] == outputs[1] and len({tuple(o) for o in outputs[0]}) == 3
    assert e.stats().spec_num_drafts > 0


def test_steps_without_adapter_rows_keep_the_fused_decode_step(llama, monkeypatch):
    e = engine(llama["base"])
    if e.model.fused is None:
        pytest.skip("this machine's ops have no fused decode step")
    e.add_lora("a", llama["a"])
    calls = []
    real = e.model.fused.forward
    monkeypatch.setattr(e.model.fused, "forward", lambda *args: calls.append(1) or real(*args))
    forced_logits(e, {"plain": None})
    assert len(calls) == len(FORCED) - 1                      # every decode step of the base-only run
    calls.clear()
    forced_logits(e, {"plain": None, "adapted": "a"})
    assert calls == []


@pytest.mark.parametrize("quantization, tolerance", [("w8a8", 0.05), ("w4a16", 0.2)])
def test_quantized_base_gets_the_adapters_delta(llama, quantization, tolerance):
    """Over a base rounded to 8 or 4 bits at load, the adapter adds the reference's change of the
    logits: (quantized + adapter) - quantized ~ merged - float, within the rounding's own effect
    (relative error below `tolerance`, measured 0.01 and 0.06 here; without the delta it would be 1)."""
    e = engine(llama["base"], quantization=quantization)
    e.add_lora("a", llama["a"])
    assert e.model.weight_quantized()
    got_delta = forced_logits(e, {"qa": "a"})["qa"] - forced_logits(e, {"q": None})["q"]
    ref_delta = (reference_logits(llama["base"], llama["a"], prompt_of(0), len(FORCED))
                 - reference_logits(llama["base"], None, prompt_of(0), len(FORCED)))
    assert (got_delta - ref_delta).norm() / ref_delta.norm() < tolerance


def test_prefix_cache_never_shares_blocks_across_adapters(llama):
    e = engine(llama["base"], enable_prefix_caching=True)
    e.add_lora("a", llama["a"])
    e.add_lora("b", llama["b"])

    def run(lora):
        r = e.add_request("r", PROMPT, SamplingParams(max_new_tokens=4), lora=lora)
        while e.has_work:
            e.step()
        return r

    assert run(None).num_cached_tokens == 0
    first_a = run("a")
    assert first_a.num_cached_tokens == 0                     # the base model's blocks are not a's
    again_a = run("a")
    assert again_a.num_cached_tokens == 32 and again_a.output_token_ids == first_a.output_token_ids
    assert run("b").num_cached_tokens == 0
    assert run(None).num_cached_tokens == 32
    e.remove_lora("a")
    e.add_lora("a", llama["b"])                                # the same name, other weights
    reused_name = run("a")
    assert reused_name.num_cached_tokens == 0
    assert reused_name.output_token_ids == greedy_reference(llama["base"], llama["b"], PROMPT, 4)


def test_engine_api_and_refusals(llama, tmp_path):
    e = engine(llama["base"], max_loras=2, max_lora_rank=8)
    e.add_lora("a", llama["a"])
    with pytest.raises(RequestError, match="no LoRA adapter named 'nope'.*'a'"):
        e.add_request("x", PROMPT, SamplingParams(), lora="nope")
    with pytest.raises(LoRAError, match="already loaded"):
        e.add_lora("a", llama["b"])
    e.add_lora("b", llama["b"])
    with pytest.raises(LoRAError, match="2 adapters are loaded.*--max-loras"):
        e.add_lora("c", llama["c"])
    running = e.add_request("running", PROMPT, SamplingParams(max_new_tokens=3), lora="b")
    e.step()
    e.remove_lora("b")                                         # running requests finish with it
    with pytest.raises(LoRAError, match="2 adapters are loaded"):
        e.add_lora("c", llama["c"])
    while e.has_work:
        e.step()
    assert len(running.output_token_ids) == 3
    e.add_lora("c", llama["c"])                                # its slot is free once they have gone
    assert e.list_loras() == {"a": str(llama["a"]), "c": str(llama["c"])}
    cases = {
        "lm_head": (dict(targets=["q_proj", "lm_head"]), "lm_head"),
        "embed": (dict(targets=["embed_tokens", "q_proj"]), "model.embed_tokens"),
        "rank": (dict(r=16), "rank r=16 is over --max-lora-rank 8"),
        "dora": (dict(use_dora=True), "use_dora"),
        "pattern": (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    }
    for name, (kw, message) in cases.items():
        path = save_adapter(llama["base"], tmp_path / name, 7, **{"targets": ALL, **kw})
        with pytest.raises(LoRAError, match=message):
            e.read_lora(path)
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        e.read_lora(tmp_path)
    assert "fit this model" in str(pytest.raises(LoRAError, e.read_lora, wrong_shapes(llama["a"], tmp_path)).value)


def wrong_shapes(adapter: Path, tmp_path: Path) -> Path:
    """A copy of the adapter whose first lora_A reads a 32-wide input (an adapter of another model)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "wrong"
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    name = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


# ---- HTTP: a real `serve api_server` with --lora-modules, the official openai client ------------

@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    b = json.dumps({"name": "b", "path": str(llama["b"]), "base_model_name": "tiny"})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server", str(llama["base"]),
                                 "--model-name", "tiny", "--enable-lora", "--lora-modules", f"a={llama['a']}", b,
                                 "--admin-api-keys", "admin-key", "--max-loras", "3", "--max-lora-rank", "8",
                                 "--dtype", "float32", "--cache-max-tokens", "4096", "--server-name", "127.0.0.1",
                                 "--server-port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    assert wait_healthy(url, proc, timeout=120), log.read_text()
    yield url
    proc.terminate()
    proc.wait(30)


def engine_text(llama, lora: str | None, n: int = 8) -> str:
    from transformers import AutoTokenizer

    e = engine(llama["base"])
    if lora is not None:
        e.add_lora(lora, llama[lora])
    r = e.add_request("r", PROMPT, SamplingParams(max_new_tokens=n), lora=lora)
    while e.has_work:
        e.step()
    return AutoTokenizer.from_pretrained(llama["base"]).decode(r.output_token_ids, skip_special_tokens=True)


def websocket_chat(url: str, body: dict) -> str:
    """The reply's text over the chat WebSocket (/v1/chat/completions/ws)."""
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/v1/chat/completions/ws") as ws:
        ws.send(json.dumps(body))
        chunks = []
        while (m := ws.recv()) != "[DONE]":
            chunks.append(json.loads(m))
    assert all(c["model"] == body["model"] for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_http_models_list_completions_and_admin(llama, server, tmp_path):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a", "b"}
    assert cards["a"].parent == "tiny" and cards["a"].root == str(llama["a"]) and cards["tiny"].parent is None

    def complete(model: str) -> str:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.model == model
        return r.choices[0].text

    assert complete("a") == engine_text(llama, "a") != complete("tiny")
    assert complete("b") == engine_text(llama, "b")
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**chat)
    assert whole.model == "a" and whole.choices[0].message.content != client.chat.completions.create(
        **{**chat, "model": "tiny"}).choices[0].message.content
    assert websocket_chat(server, chat) == whole.choices[0].message.content
    answer = client.responses.create(model="a", input="hi", max_output_tokens=6, temperature=0)
    assert answer.model == "a" and answer.output_text == whole.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        complete("nope")
    assert e.value.body["code"] == "model_not_found"

    load = {"lora_name": "c", "lora_path": str(llama["c"])}
    assert httpx.post(server + "/v1/load_lora_adapter", json=load).status_code == 401
    assert httpx.post(server + "/v1/load_lora_adapter", json=load,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(server + "/v1/load_lora_adapter", json=load, headers=ADMIN)
    assert r.status_code == 200 and r.json()["parent"] == "tiny", r.text
    assert complete("c") == engine_text(llama, "c")
    refusals = {
        "d": (str(tmp_path / "missing"), "is not a directory"),
        "wrong": (str(wrong_shapes(llama["a"], tmp_path)), "fit this model"),
        "big": (str(save_adapter(llama["base"], tmp_path / "big", 4, r=16)), "--max-lora-rank 8"),
        "full": (str(llama["a"]), "3 adapters are loaded"),
        "a": (str(llama["a"]), "already served"),
    }
    for name, (path, message) in refusals.items():
        r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=ADMIN)
        error = r.json()["error"]
        assert r.status_code == 400 and message in error["message"] and error["type"] == "invalid_request_error", r.text
    assert httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 401
    assert httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=ADMIN).status_code == 200
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        complete("c")
    assert {m.id for m in client.models.list().data} == {"tiny", "a", "b"}
    assert complete("a") == engine_text(llama, "a")          # still serving


def test_pipeline_runs_each_prompt_with_its_adapter(llama):
    from quantserve.api import pipeline
    from quantserve.config import GenerationConfig

    pipe = pipeline(str(llama["base"]), EngineConfig(dtype="float32", cache_max_tokens=1024), progress=False)
    pipe.add_lora("a", str(llama["a"]))
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    adapted, plain = pipe(["the quick brown fox", "the quick brown fox"], gen, do_preprocess=False, lora=["a", None])
    ids = pipe.tokenizer.encode_prompt("the quick brown fox", False)
    assert adapted.token_ids == greedy_reference(llama["base"], llama["a"], ids, 6) != plain.token_ids
    with pytest.raises(ValueError, match="1 LoRA adapters for 2 prompts"):
        pipe(["x", "y"], gen, lora=["a"])


def test_a_reloaded_model_keeps_its_adapters(llama):
    """The registry adds a model's adapters to every engine it loads for it (here a reload)."""
    from conftest import RunningServer

    server = RunningServer(llama["base"], model_name="tiny", admin_api_keys=["admin-key"])
    try:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(llama["a"])},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        assert httpx.post(server.url + "/v1/models/load", json={"model": "a", "path": str(llama["base"])},
                          headers=ADMIN).status_code == 409            # the name is the adapter's
        before = server.state.models.get("tiny")
        assert httpx.post(server.url + "/v1/models/reload", json={"model": "tiny"}, headers=ADMIN).status_code == 200
        assert server.state.models.get("tiny") is not before
        text = server.client().completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   extra_body={"ignore_eos": True}).choices[0].text
        assert text == engine_text(llama, "a")
        assert httpx.post(server.url + "/v1/models/unload", json={"model": "tiny"}, headers=ADMIN).status_code == 200
        assert server.state.models.adapters == {}                      # a model's adapters go with it
    finally:
        server.close()


def test_an_adapter_that_no_longer_loads_does_not_keep_its_model_down(llama, tmp_path):
    """Its directory gone, a reload drops the adapter (404 from then on, logged) and the model serves."""
    import shutil

    from conftest import RunningServer

    gone = shutil.copytree(llama["b"], tmp_path / "b")
    server = RunningServer(llama["base"], model_name="tiny", admin_api_keys=["admin-key"])
    try:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(gone)},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        shutil.rmtree(gone)
        assert httpx.post(server.url + "/v1/models/reload", json={"model": "tiny"}, headers=ADMIN).status_code == 200
        client = server.client()
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).choices[0].text is not None
        assert "b" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt=PROMPT, max_tokens=4)
    finally:
        server.close()


def test_adapter_names_on_grpc_sessions_and_the_lookup_routes(llama):
    """gRPC Generate and a WebSocket session run an adapter's name with the adapter (the chat
    completion's reply through it); tokenize, count_tokens and /info answer for its base model."""
    import grpc

    from conftest import RunningServer
    from quantserve.serve.grpc_service import load_protos
    from test_ws_session import session

    pb, services = load_protos()
    server = RunningServer(llama["base"], model_name="tiny", grpc_port=free_port(), admin_api_keys=["admin-key"])
    try:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(llama["a"])},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        client = server.client()
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
        want = client.chat.completions.create(model="a", **chat).choices[0].message.content
        assert want != client.chat.completions.create(model="tiny", **chat).choices[0].message.content
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = services.QuantserveStub(channel)
            got = "".join(m.text for m in stub.Generate(pb.GenerateRequest(
                model="a", messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=6, temperature=0), timeout=60))
        assert got == want
        with session(server) as s:
            s.send(type="session.start", model="a", temperature=0, max_tokens=6)
            assert s.recv()["type"] == "session.started"
            assert s.turn("hi")[0] == want
        tokens = httpx.post(server.url + "/v1/tokenize", json={"model": "a", "prompt": "hi"}).json()
        assert tokens == httpx.post(server.url + "/v1/tokenize", json={"model": "tiny", "prompt": "hi"}).json()
        count = httpx.post(server.url + "/v1/messages/count_tokens",
                           json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
        assert count.status_code == 200 and count.json()["input_tokens"] > 0
        assert httpx.get(server.url + "/info", params={"model": "a"}).json()["model"] == "tiny"
    finally:
        server.close()
