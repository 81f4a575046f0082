"""Load a model into a Service and run the HTTP server around it."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from quantserve.config import EngineConfig, GenerationConfig
from quantserve.serve.metrics import ServerMetrics
from quantserve.config import ServerConfig
from quantserve.serve.openai_app import ServerState, build_app
from quantserve.serve.plan import ModelInfo
from quantserve.serve.registry import Loader
from quantserve.serve.service import Service
from quantserve.serve.transport import uvicorn_options

logger = logging.getLogger("quantserve.serve")


def load_service(name: str, model_path: str | None, engine_config: EngineConfig, server: ServerConfig,
                 hub: ServerMetrics, chat_template: str | None = None, tool_call_parser: str | None = None,
                 progress: bool = True) -> tuple[Service, dict]:
    """Model -> Engine -> AsyncEngine -> Service, and the /v1/models card."""
    from quantserve.engine.async_engine import AsyncEngine
    from quantserve.engine.encoder import is_encoder
    from quantserve.engine.engine import Engine
    from quantserve.models.resolve import resolve_model
    from quantserve.serve.tools import parser_for
    from quantserve.text import Tokenizer, load_chat_template

    path = resolve_model(model_path, progress=progress)
    if is_encoder(path):
        async_engine, model = load_encoder(path, engine_config, server)
    else:
        draft = resolve_model(engine_config.speculative_model, progress) if engine_config.speculative_model else None
        check_memory(path, engine_config, draft)
        engine = Engine(path, engine_config, progress=progress)
        tokenizer = Tokenizer(path, load_chat_template(chat_template))
        defaults = GenerationConfig.from_model(path, do_sample=True, temperature=1.0)
        model = ModelInfo(tokenizer, engine.session_len, engine.args.vocab_size, defaults,
                          parser_for(tokenizer.chat_template, tool_call_parser), server.default_max_tokens,
                          reasoning_parser=server.reasoning_parser, **decoder_pooling(path, tokenizer, server.pooling))
        async_engine = AsyncEngine(engine)
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "quantserve",
            "root": str(path), "max_model_len": model.session_len, "capabilities": model.capabilities}
    print(f"quantserve: '{name}' from {path}\n{async_engine.engine.memory_summary()}", file=sys.stderr, flush=True)
    return Service(async_engine, model, server.limits, hub.for_model(name, async_engine.stats)), card


def load_encoder(path: Path, config: EngineConfig, server: ServerConfig):
    """An embedding model or a cross-encoder: the encoder engine, and what it can do."""
    from quantserve.engine.encoder import AsyncEncoder, Encoder
    from quantserve.text import Tokenizer

    encoder = Encoder(path, max_batch_size=config.max_batch_size or 64, num_threads=config.num_threads or 0,
                      dtype=config.dtype)
    scores = bool(encoder.args.num_labels)                 # a cross-encoder scores instead of embedding
    model = ModelInfo(Tokenizer(path), encoder.session_len, encoder.vocab_size, GenerationConfig(), None,
                      generates=False, pooling=None if scores else encoder.pooling_for(server.pooling), truncate=True,
                      cross_encoder=scores, matryoshka_dimensions=matryoshka(path))
    return AsyncEncoder(encoder), model


def decoder_pooling(path: Path, tokenizer, asked: str | None) -> dict:
    """A decoder embeds with --pooling (or the pooling its sentence-transformers files declare),
    normalized; it scores as a yes/no reranker when "yes" and "no" are single tokens."""
    from quantserve.engine.request import Pooling
    from quantserve.models.pooling import sentence_config

    declared = sentence_config(path)
    kind = asked or declared.kind
    yes, no = (tokenizer.hf.encode(w, add_special_tokens=False) for w in ("yes", "no"))
    return {"pooling": Pooling(kind) if kind else None, "matryoshka_dimensions": matryoshka(path),
            "score_tokens": (yes[0], no[0]) if len(yes) == len(no) == 1 else None}


def matryoshka(path: Path) -> list[int] | bool | None:
    """The embedding sizes a model was trained to be cut to, as its config.json declares them."""
    from quantserve.models.loader import read_config

    cfg = read_config(path)
    return cfg.get("matryoshka_dimensions") or cfg.get("is_matryoshka") or None


def check_memory(path: Path, config: EngineConfig, draft: Path | None = None) -> None:
    """Refuse, before anything is allocated, a model whose weights and one full session of KV
    cache (or the cache asked for) do not fit in the free memory; with a draft model, its weights
    and its cache (a slot for every one of the model's) count too."""
    from quantserve.kvcache.budget import budget_bytes, free_memory
    from quantserve.models.loader import read_config

    weights, per_token = model_bytes(path, config, config.quant_policy or 0)
    if draft is not None:                       # its cache is never quantized
        draft_weights, draft_per_token = model_bytes(draft, config, 0)
        weights, per_token = weights + draft_weights, per_token + draft_per_token
    free = free_memory(config.device)
    tokens = config.cache_max_tokens or config.session_len or read_config(path).get("max_position_embeddings", 4096)
    kv = tokens * per_token
    if isinstance(config.cache_max_entry_count, str) and config.cache_max_tokens is None:
        kv = max(kv, budget_bytes(config.cache_max_entry_count, free))
    if weights + kv > free:
        with_draft = " (the model's and the draft model's)" if draft is not None else ""
        raise MemoryError(f"not enough memory: {weights / 1e9:.2f} GB of weights + {kv / 1e9:.2f} GB of KV cache "
                          f"({tokens:,} tokens){with_draft} > {free / 1e9:.2f} GB free")


def model_bytes(path: Path, config: EngineConfig, quant_policy: int) -> tuple[int, int]:
    """A model directory's (weight bytes, KV cache bytes per token) under `config` with KV cache
    quantization `quant_policy`, from its config."""
    from quantserve.bench.memory import kv_bytes_per_token, shape_from_config, weight_bytes
    from quantserve.models.loader import read_config

    cfg = read_config(path)
    shape = shape_from_config(cfg)
    quant = cfg.get("quantization_config") or {}
    dtype = "fp32" if config.dtype == "float32" else "bf16"
    weights = weight_bytes(shape.params, dtype, quant.get("bits", 16), quant.get("group_size", 128))
    if quant.get("quant_method") == "gguf":     # mixed widths: the converted file's size is the weights'
        weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return weights, kv_bytes_per_token(shape, dtype, quant_policy) or 0


def make_loader(engine_config: EngineConfig, server: ServerConfig, hub: ServerMetrics,
                chat_template: str | None = None, tool_call_parser: str | None = None,
                progress: bool = True) -> Loader:
    """How the registry loads a model: the server's engine settings with the request's overrides."""
    def load(name: str, path: str | None, overrides: dict) -> tuple[Service, dict]:
        config = dataclasses.replace(engine_config, **overrides)
        return load_service(name, path, config, server, hub, chat_template, tool_call_parser, progress)
    return load


def run_server(models: list[tuple[str, str | None]], engine_config: EngineConfig, server: ServerConfig, host: str,
               port: int, chat_template: str | None = None, tool_call_parser: str | None = None,
               log_level: str = "WARNING", ssl: bool = False, ssl_keyfile: str | None = None,
               ssl_certfile: str | None = None, with_ui: bool = False, proxy_url: str | None = None) -> None:
    """Serve the API for `models` ((name, path) pairs; with_ui also the chat page at `/`) until
    interrupted; with proxy_url, register with that router once every model is loaded."""
    import uvicorn

    state = ServerState(server)
    state.models.loader = make_loader(engine_config, server, state.metrics, chat_template, tool_call_parser)
    app = build_app(state, ui=build_self_ui(port, server, ssl) if with_ui else None)
    loading = state.models.start(models, on_error=exit_on_load_error, loras=server.lora_modules)
    scheme = "https" if ssl else "http"
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    page = f"chat page: {scheme}://{shown}:{port}/; " if with_ui else ""
    names = ", ".join(f"'{name}'" for name, _ in models)
    grpc_note = f"; gRPC (plaintext) at {shown}:{server.grpc_port}" if server.grpc_port else ""
    print(f"quantserve: serving {names} at {scheme}://{shown}:{port}/v1 "
          f"({page}API docs: {scheme}://{shown}:{port}/docs; /health is 503 until the models are loaded{grpc_note})",
          file=sys.stderr, flush=True)
    if proxy_url:
        register_with_proxy(proxy_url, f"{scheme}://{reachable_host(host)}:{port}", loading)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), ssl_keyfile=ssl_keyfile if ssl else None,
                ssl_certfile=ssl_certfile if ssl else None, timeout_graceful_shutdown=5,
                ws_max_size=server.limits.max_body_bytes, **uvicorn_options(server.connections))


def reachable_host(host: str) -> str:
    """The address other machines use for this one when listening on every interface."""
    import socket

    if host not in ("0.0.0.0", "::"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def register_with_proxy(proxy_url: str, own_url: str, loading) -> None:
    """LMDeploy's --proxy-url: once the models are loaded, add this server to the router's nodes."""
    import threading

    import httpx

    def run():
        loading.join()
        try:
            r = httpx.post(proxy_url.rstrip("/") + "/nodes/add", json={"url": own_url}, timeout=10)
            r.raise_for_status()
            print(f"quantserve: registered {own_url} with the proxy at {proxy_url}", file=sys.stderr, flush=True)
        except httpx.HTTPError as e:
            logger.warning("could not register with the proxy at %s: %s", proxy_url, e)
    threading.Thread(target=run, name="quantserve-register", daemon=True).start()


def build_self_ui(port: int, server: ServerConfig, ssl: bool):
    """The chat page of in-process mode: it calls this same server's API."""
    from quantserve.serve.webui import Backend, build_ui

    scheme = "https" if ssl else "http"
    key = server.api_keys[0] if server.api_keys else None
    return build_ui(Backend(f"{scheme}://127.0.0.1:{port}", key), title=f"quantserve · {server.model_name}")


def run_ui(url: str, api_key: str | None, host: str, port: int) -> None:
    """Client mode: the chat page for a server running elsewhere."""
    from quantserve.serve.webui import Backend, build_ui

    print(f"quantserve: chat page for {url} at http://{'localhost' if host == '0.0.0.0' else host}:{port}/",
          file=sys.stderr, flush=True)
    build_ui(Backend(url, api_key), title=f"quantserve · {url}").launch(server_name=host, server_port=port,
                                                                        footer_links=[])


def exit_on_load_error(error: Exception) -> None:
    """From the command line a model that cannot load ends the server with one line."""
    print(f"quantserve serve: error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def default_model_name(model_path: str | None) -> str:
    if model_path is None:
        return "SmolLM2-135M-Instruct"
    return Path(model_path.rstrip("/")).name.removesuffix(".gguf")
