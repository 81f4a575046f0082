"""The gRPC API (`--grpc-port`) through a real server and a client built from the shipped .proto:
the same text, vectors, errors, limits and metrics as the HTTP API."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, free_port, wait_healthy
from quantserve.serve.grpc_service import load_protos

pb, services = load_protos()
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROMPT = "The capital of France is"
LONG = "The capital of France is Paris. " * 16          # more than one 64-token KV block


@pytest.fixture(scope="module")
def server(tiny_server_model):
    server = RunningServer(tiny_server_model, grpc_port=free_port())
    yield server
    server.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield services.QuantserveStub(channel)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    server = RunningServer(minilm_dir, model_name="minilm", grpc_port=free_port())
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield server, services.QuantserveStub(channel)
    server.close()


@pytest.fixture(scope="module")
def keyed(tiny_server_model):
    """A server that wants API keys and allows 2 generations a minute per key."""
    from quantserve.config import Limits

    server = RunningServer(tiny_server_model, grpc_port=free_port(), api_keys=["k1", "k2"], limits=Limits(rate_limit=2))
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield server, channel
    server.close()


def generate(stub, metadata=None, **fields) -> list:
    return list(stub.Generate(pb.GenerateRequest(**fields), metadata=metadata, timeout=60))


def joined(messages: list) -> tuple[str, list[int]]:
    return "".join(m.text for m in messages), [t for m in messages for t in m.token_ids]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def metric(server, name: str, **labels) -> float:
    """A sample's value on /metrics (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_generate_streams_the_completions_text_then_finish_and_usage(server, stub):
    http = server.client().completions.create(model="tiny", prompt=LONG, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
    messages = generate(stub, prompt=LONG, max_tokens=12, temperature=0, ignore_eos=True)
    text, ids = joined(messages)
    assert text == http.choices[0].text and len(ids) == 12
    assert [m.finish_reason for m in messages[:-1]] == [""] * (len(messages) - 1)
    last = messages[-1]
    assert last.finish_reason == "length" == http.choices[0].finish_reason
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (http.usage.prompt_tokens, 12)
    assert not any(m.HasField("usage") for m in messages[:-1])
    prompt_ids = httpx.post(server.url + "/v1/tokenize", json={"prompt": LONG}).json()["tokens"]
    again = generate(stub, token_ids=prompt_ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert joined(again) == (text, ids)
    assert again[-1].usage.cached_tokens >= 64             # the same prompt: its first block came from the cache


def test_generate_with_chat_messages_matches_chat_completions(server, stub):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    http = server.client().chat.completions.create(model="tiny", messages=chat, max_tokens=10, temperature=0)
    messages = generate(stub, messages=[pb.ChatMessage(**m) for m in chat], max_tokens=10, temperature=0)
    assert joined(messages)[0] == http.choices[0].message.content
    assert messages[-1].finish_reason == http.choices[0].finish_reason
    assert messages[-1].usage.prompt_tokens == http.usage.prompt_tokens
    assert messages[-1].usage.completion_tokens == http.usage.completion_tokens


def test_stop_strings_end_the_text_as_over_http(server, stub):
    full, _ = joined(generate(stub, prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    http = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    messages = generate(stub, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert joined(messages)[0] == http.choices[0].text == full[:full.index(stop)]
    assert messages[-1].finish_reason == "stop"


def test_seeded_sampling_repeats(stub):
    runs = [joined(generate(stub, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7,
                            ignore_eos=True)) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0][1]) == 12


def test_generate_counts_in_the_http_metrics(server, stub):
    before = {name: metric(server, name, model_name="tiny") for name in ("vllm:prompt_tokens_total",
                                                                          "vllm:generation_tokens_total")}
    done = metric(server, "vllm:request_success_total", model_name="tiny", finished_reason="length")
    last = generate(stub, prompt=PROMPT, max_tokens=5, temperature=0, ignore_eos=True)[-1]
    assert metric(server, "vllm:request_success_total", model_name="tiny", finished_reason="length") == done + 1
    assert metric(server, "vllm:prompt_tokens_total", model_name="tiny") == \
        before["vllm:prompt_tokens_total"] + last.usage.prompt_tokens
    assert metric(server, "vllm:generation_tokens_total", model_name="tiny") == \
        before["vllm:generation_tokens_total"] + 5


@pytest.mark.parametrize("fields, code, words", [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
    (dict(prompt="hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", temperature=7.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="hi", top_p=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of prompt, messages and token_ids"),
    (dict(prompt="hi", token_ids=[1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of"),
    (dict(token_ids=[5, 100000]), grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in"),
    (dict(messages=[pb.ChatMessage(role="robot", content="hi")]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
    (dict(prompt="hi", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    (dict(prompt="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop strings must not be empty"),
    (dict(prompt="hi", enable_thinking=False), grpc.StatusCode.INVALID_ARGUMENT, "enable_thinking goes with messages"),
    (dict(prompt="hi", model="nope"), grpc.StatusCode.NOT_FOUND, "'nope' does not exist"),
])
def test_bad_generate_requests_get_their_code_and_the_server_goes_on(server, stub, fields, code, words):
    error = rpc_error(lambda: generate(stub, **fields))
    assert error.code() == code and words in error.details(), error.details()
    assert len(generate(stub, prompt=PROMPT, max_tokens=3, temperature=0, ignore_eos=True)) >= 1


def test_cancelling_a_stream_aborts_its_engine_request(server, stub):
    aborted = metric(server, "quantserve:requests_aborted_total", model_name="tiny")
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=1800, ignore_eos=True, temperature=0))
    next(call)
    assert server.engine.stats().num_running == 1
    call.cancel()
    deadline = time.monotonic() + 30
    while server.engine.stats().num_running + server.engine.stats().num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats().num_running == server.engine.stats().num_waiting == 0
    assert metric(server, "quantserve:requests_aborted_total", model_name="tiny") == aborted + 1
    assert server.state.service.active == 0                # its admission ticket was given back


def test_reasoning_comes_apart_from_the_text_as_on_chat(tiny_chat_model, tmp_path):
    from test_reasoning import TEMPLATE            # a template that opens a think block, as DeepSeek-R1's

    shutil.copytree(tiny_chat_model, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(TEMPLATE)
    server = RunningServer(tmp_path / "m", reasoning_parser="deepseek_r1", grpc_port=free_port())
    ask = [{"role": "user", "content": "Why is the sky blue?"}]
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = services.QuantserveStub(channel)
            for thinking in (True, False):
                kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
                chat = server.client().chat.completions.create(model="tiny", messages=ask, max_tokens=12,
                                                               temperature=0, extra_body=kwargs).choices[0].message
                got = generate(stub, messages=[pb.ChatMessage(**m) for m in ask], max_tokens=12, temperature=0,
                               enable_thinking=thinking)
                assert "".join(m.reasoning for m in got) == (getattr(chat, "reasoning_content", None) or "")
                assert joined(got)[0] == (chat.content or "")
                assert bool("".join(m.reasoning for m in got)) == thinking
    finally:
        server.close()


def test_models_lists_capabilities(server, stub, minilm):
    (card,) = stub.Models(pb.ModelsRequest(), timeout=10).models
    assert (card.id, list(card.capabilities), card.max_model_len) == ("tiny", ["chat", "completions"], 2048)
    http = server.client().models.list().data[0]
    assert (card.root, card.created, card.owned_by) == (http.root, http.created, http.owned_by)
    (embedder,) = minilm[1].Models(pb.ModelsRequest(), timeout=10).models
    assert embedder.id == "minilm" and list(embedder.capabilities) == ["embeddings"]


def test_embed_gives_the_vectors_of_v1_embeddings(minilm):
    server, stub = minilm
    texts = ["The cat sat on the mat.", "Gradient descent minimizes a loss.", "日本語のテキスト"]
    got = stub.Embed(pb.EmbedRequest(texts=texts), timeout=60)
    http = httpx.post(server.url + "/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    ours = np.array([list(e.values) for e in got.embeddings], dtype=np.float32)
    theirs = np.array([d["embedding"] for d in http["data"]], dtype=np.float32)
    assert ours.shape == (3, 384) and np.array_equal(ours, theirs)
    assert got.prompt_tokens == http["usage"]["prompt_tokens"] and got.model == "minilm"
    ids = server.state.service.model.tokenizer.hf(texts)["input_ids"]
    by_ids = stub.Embed(pb.EmbedRequest(model="minilm", token_ids=[pb.TokenIds(ids=i) for i in ids]), timeout=60)
    assert np.array_equal(np.array([list(e.values) for e in by_ids.embeddings], dtype=np.float32), ours)


@pytest.mark.parametrize("fields, words", [
    (dict(), "input must not be empty"),
    (dict(texts=["a", ""]), "an input is empty"),
    (dict(texts=["a"], token_ids=[pb.TokenIds(ids=[1])]), "texts or token_ids, not both"),
    (dict(texts=["a"], dimensions=0), "dimensions"),
    (dict(texts=["a"], dimensions=100), "dimensions must be"),
    (dict(token_ids=[pb.TokenIds(ids=[101, 10 ** 6])]), "token ids must be in"),
])
def test_bad_embed_requests_are_invalid_argument(minilm, fields, words):
    _, stub = minilm
    error = rpc_error(lambda: stub.Embed(pb.EmbedRequest(**fields), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()
    assert len(stub.Embed(pb.EmbedRequest(texts=["still here"]), timeout=30).embeddings) == 1


def test_each_model_refuses_what_it_cannot_do(stub, minilm):
    error = rpc_error(lambda: stub.Embed(pb.EmbedRequest(texts=["hello"]), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not embed" in error.details()
    error = rpc_error(lambda: generate(minilm[1], prompt="hello"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "only embeds" in error.details()


def test_health_mirrors_http_health(server, tmp_path):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "quantserve.v1.Quantserve"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        models = server.state.models
        models.start([("broken", str(tmp_path))]).join(30)     # no config.json: its load fails
        try:
            assert httpx.get(server.url + "/health").status_code == 503
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
            assert next(watch).status == NOT_SERVING
        finally:
            models.slots.pop("broken")
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert next(watch).status == SERVING
        watch.cancel()


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_target) as channel:
        names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"quantserve.v1.Quantserve", "grpc.health.v1.Health"} <= names


def test_api_keys_are_required_except_for_health(keyed):
    _, channel = keyed
    stub = services.QuantserveStub(channel)
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "k1")], [("x-api-key", "nope")]):
        error = rpc_error(lambda: stub.Models(pb.ModelsRequest(), metadata=metadata, timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
        error = rpc_error(lambda: generate(stub, metadata, prompt="hi"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Models(pb.ModelsRequest(), metadata=[("authorization", "Bearer k1")], timeout=10).models[0].id == "tiny"
    assert stub.Models(pb.ModelsRequest(), metadata=[("x-api-key", "k1")], timeout=10).models[0].id == "tiny"
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def test_rate_limit_is_resource_exhausted_per_key(keyed):
    server, channel = keyed
    stub = services.QuantserveStub(channel)
    rejected = metric(server, "quantserve:requests_rejected_total", model_name="tiny", reason="rate_limit")
    k2 = [("authorization", "Bearer k2")]
    for _ in range(2):
        assert generate(stub, k2, prompt="hi", max_tokens=2)[-1].finish_reason
    call = stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), metadata=k2, timeout=10)
    error = rpc_error(lambda: list(call))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in error.details()
    assert int(dict(call.trailing_metadata())["retry-after"]) >= 1
    assert metric(server, "quantserve:requests_rejected_total", model_name="tiny", reason="rate_limit") == rejected + 1
    assert generate(stub, [("x-api-key", "k1")], prompt="hi", max_tokens=2)[-1].finish_reason   # k1 has its own


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")    # uvicorn's exit(3)
def test_a_grpc_port_already_taken_fails_the_start_up(tiny_server_model, server, stub):
    port = int(server.grpc_target.rpartition(":")[2])
    with pytest.raises(RuntimeError, match="did not start"):
        RunningServer(tiny_server_model, grpc_port=port)
    assert generate(stub, prompt="hi", max_tokens=2, ignore_eos=True)[-1].finish_reason == "length"   # still serves


def test_cli_serves_grpc_next_to_http(tiny_server_model, tmp_path):
    port, grpc_port = free_port(), free_port()
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "quantserve.cli.main", "serve", "api_server",
                                 str(tiny_server_model), "--server-name", "127.0.0.1", "--server-port", str(port),
                                 "--grpc-port", str(grpc_port), "--model-name", "cli", "--dtype", "float32"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", proc), (tmp_path / "log").read_text()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
            last = generate(services.QuantserveStub(channel), prompt=PROMPT, max_tokens=4, ignore_eos=True)[-1]
        assert (last.finish_reason, last.usage.completion_tokens) == ("length", 4)
        assert f"gRPC (plaintext) at 127.0.0.1:{grpc_port}" in (tmp_path / "log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_grpc_port_flag_is_checked():
    from quantserve.cli.main import build_parser
    from quantserve.cli.serve import check_server_flags
    from quantserve.config import ConfigError

    parse = build_parser().parse_args
    for value in ("0", "70000", "23333"):
        with pytest.raises(ConfigError) as e:
            check_server_flags(parse(["serve", "api_server", "--grpc-port", value]))
        assert e.value.field == "grpc_port"
    check_server_flags(parse(["serve", "api_server", "--grpc-port", "50051"]))
