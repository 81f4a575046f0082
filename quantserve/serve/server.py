"""Load a model into a Service and run the HTTP server around it."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from quantserve.config import EngineConfig, GenerationConfig
from quantserve.serve.metrics import Metrics
from quantserve.serve.openai_app import ServerConfig, ServerState, build_app
from quantserve.serve.plan import ModelInfo
from quantserve.serve.service import Service

logger = logging.getLogger("quantserve.serve")


def load_service(model_path: str | None, engine_config: EngineConfig, server: ServerConfig,
                 chat_template: str | None = None, tool_call_parser: str | None = None,
                 progress: bool = True) -> tuple[Service, dict]:
    """Model -> Engine -> AsyncEngine -> Service, and the /v1/models card."""
    from quantserve.engine.async_engine import AsyncEngine
    from quantserve.engine.engine import Engine
    from quantserve.models.resolve import resolve_model
    from quantserve.serve.tools import parser_for
    from quantserve.text import Tokenizer, load_chat_template

    path = resolve_model(model_path, progress=progress)
    engine = Engine(path, engine_config, progress=progress)
    tokenizer = Tokenizer(path, load_chat_template(chat_template))
    defaults = GenerationConfig.from_model(path, do_sample=True, temperature=1.0)
    model = ModelInfo(tokenizer, engine.session_len, engine.args.vocab_size, defaults,
                      parser_for(tokenizer.chat_template, tool_call_parser), server.default_max_tokens)
    async_engine = AsyncEngine(engine)
    metrics = Metrics(server.model_name, async_engine.stats)
    card = {"id": server.model_name, "object": "model", "created": int(time.time()), "owned_by": "quantserve",
            "root": str(path), "max_model_len": engine.session_len}
    print(f"quantserve: {path}\n{engine.memory_summary()}", file=sys.stderr, flush=True)
    return Service(async_engine, model, server.limits, metrics), card


def run_server(model_path: str | None, engine_config: EngineConfig, server: ServerConfig, host: str, port: int,
               chat_template: str | None = None, tool_call_parser: str | None = None, log_level: str = "WARNING",
               ssl: bool = False, ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
               with_ui: bool = False) -> None:
    """Serve the API (and, with_ui, the chat page at `/`) until interrupted."""
    import uvicorn

    state = ServerState(server)
    app = build_app(state, ui=build_self_ui(port, server, ssl) if with_ui else None)
    state.load_in_background(lambda: load_service(model_path, engine_config, server, chat_template,
                                                  tool_call_parser), on_error=exit_on_load_error)
    scheme = "https" if ssl else "http"
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    page = f"chat page: {scheme}://{shown}:{port}/; " if with_ui else ""
    print(f"quantserve: serving '{server.model_name}' at {scheme}://{shown}:{port}/v1 "
          f"({page}API docs: {scheme}://{shown}:{port}/docs; /health is 503 until the model is loaded)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), ssl_keyfile=ssl_keyfile if ssl else None,
                ssl_certfile=ssl_certfile if ssl else None, timeout_graceful_shutdown=5,
                ws_max_size=server.limits.max_body_bytes)


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
