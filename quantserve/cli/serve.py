"""`quantserve serve api_server [MODEL]` and `quantserve serve api_client URL`, with LMDeploy's flags."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from quantserve.cli.args import add_config_args, add_engine_args, boolean, config_values, engine_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    from quantserve.config import ServerConfig

    sub = p.add_subparsers(dest="serve_command", required=True, metavar="{api_server,api_client,gradio,proxy,ray}")
    server = sub.add_parser("api_server", help="OpenAI-compatible HTTP server (one model or several)")
    server.add_argument("model_path", nargs="*", default=[],
                        help="model directories or .gguf files, a directory of models, or nothing for the "
                             "default model (SmolLM2-135M-Instruct)")
    add_engine_args(server)
    add_server_args(server)
    add_connection_args(server)
    g = server.add_argument_group("models")
    add_config_args(g, ServerConfig, only=("admin_api_keys", "models_dir", "lora_modules"))
    g.add_argument("--proxy-url", default=None, help="register with this `serve proxy` once loaded")
    add_config_args(server.add_argument_group("grpc"), ServerConfig, only=("grpc_port",))
    ui = sub.add_parser("gradio", help="chat page: for a running api_server (URL), or with the model in-process")
    ui.add_argument("model_path", nargs="?", default=None, metavar="URL_OR_MODEL",
                    help="http(s)://host:port of an api_server, or a model (nothing: the default model)")
    ui.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key of the api_server (URL mode)")
    ui.add_argument("--restful-api", type=boolean, default=None,
                    help="LMDeploy's spelling: True when the argument is an api_server's URL (detected when omitted)")
    add_engine_args(ui)
    add_server_args(ui, port=6006)
    add_connection_args(ui)
    client = sub.add_parser("api_client", help="chat with a running api_server from the terminal")
    client.add_argument("api_server_url", help="e.g. http://localhost:23333")
    client.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key, if the server needs one")
    client.add_argument("--model", default=None, help="model name (default: the server's first model)")
    client.add_argument("--system", default=None, help="system prompt")
    client.add_argument("--temperature", type=float, default=None)
    client.add_argument("--max-tokens", type=int, default=None)
    add_proxy_args(sub.add_parser("proxy", help="one OpenAI endpoint routing to several api_servers"))
    add_ray_args(sub.add_parser("ray", help="replicas of the api_server on Ray Serve (local cluster or --ray-address)"))


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None,
                   help="model directory or .gguf file (nothing: the default model, SmolLM2-135M-Instruct)")
    add_engine_args(p)
    add_server_args(p)
    g = p.add_argument_group("ray")
    g.add_argument("--num-replicas", type=int, default=1, help="engine replicas (each holds the model)")
    g.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="scale between MIN and MAX replicas by the requests each one holds (replaces --num-replicas)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (also its torch threads unless --num-threads is given)")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests a replica holds at once; more wait in Ray Serve's router")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: start a local one")


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    from quantserve.serve.proxy import STRATEGIES

    p.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    p.add_argument("--server-port", type=int, default=8000)
    p.add_argument("--routing-strategy", "--strategy", dest="routing_strategy", default="min_expected_latency",
                   choices=STRATEGIES, help="how a node is chosen among those serving the request's model")
    p.add_argument("--serving-strategy", default="Hybrid", choices=["Hybrid"],
                   help="accepted for LMDeploy compatibility (prefill/decode disaggregation is not supported)")
    p.add_argument("--health-interval", type=float, default=5.0,
                   help="seconds between health checks of every node; a failing node leaves the rotation")
    p.add_argument("--nodes", nargs="*", default=[], help="api_server URLs to start with")
    p.add_argument("--api-keys", nargs="*", default=None, help="Bearer keys the proxy accepts (default: none needed)")
    p.add_argument("--log-level", default="WARNING")


def add_server_args(p: argparse.ArgumentParser, port: int = 23333) -> None:
    from quantserve.config import Limits, ServerConfig

    g = p.add_argument_group("server")
    g.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    g.add_argument("--server-port", type=int, default=port)
    g.add_argument("--model-name", nargs="+", default=None,
                   help="name served in /v1/models, one per model (default: the model directory's name)")
    add_config_args(g, ServerConfig, skip=API_SERVER_ONLY)
    add_config_args(g, Limits)
    g.add_argument("--tool-call-parser", default=None, choices=["hermes", "qwen", "qwen2_5", "internlm", "internlm2", "llama3"],
                   help="tool-call format (default: detected from the chat template)")
    g.add_argument("--ssl", action="store_true", help="serve HTTPS with --ssl-certfile / --ssl-keyfile "
                   "(default: the SSL_CERTFILE / SSL_KEYFILE environment variables, as LMDeploy)")
    g.add_argument("--ssl-certfile", default=os.environ.get("SSL_CERTFILE"))
    g.add_argument("--ssl-keyfile", default=os.environ.get("SSL_KEYFILE"))
    g.add_argument("--disable-prefix-caching", action="store_true",
                   help="prefix caching is on by default when serving (n > 1 and repeated prompts share KV blocks)")
    g.add_argument("--instance-num", dest="max_batch_size", type=int,
                   help="LMDeploy's old name for --max-batch-size")
    g.add_argument("--max-log-len", type=int, default=None, help="accepted for LMDeploy compatibility")


# ServerConfig's flags that only `serve api_server` has: run-time model admin and gRPC
API_SERVER_ONLY = ("admin_api_keys", "models_dir", "grpc_port", "lora_modules")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    from quantserve.config import ConnectionLimits

    add_config_args(p.add_argument_group("connections"), ConnectionLimits)


def connections_from(ns):
    from quantserve.config import ConnectionLimits

    return ConnectionLimits(**config_values(ns, ConnectionLimits))


def run(ns) -> int:
    if ns.serve_command == "api_client":
        from quantserve.serve.client import run_client

        return run_client(ns.api_server_url, ns.api_key, ns.model, ns.system, ns.temperature, ns.max_tokens)
    if ns.serve_command == "proxy":
        return run_proxy(ns)
    if ns.serve_command == "ray":
        return run_ray(ns)
    if ns.serve_command == "gradio" and ns.restful_api is not None and ns.restful_api != is_url(ns.model_path):
        raise ValueError(f"--restful-api {ns.restful_api}: " + ("give the api_server's URL (http://host:port)"
                                                                 if ns.restful_api else "give a model, not a URL"))
    if ns.serve_command == "gradio" and is_url(ns.model_path):
        from quantserve.serve.server import run_ui

        run_ui(ns.model_path, ns.api_key, ns.server_name, ns.server_port)
        return 0
    return run_api_server(ns, with_ui=ns.serve_command == "gradio")


def run_proxy(ns) -> int:
    from quantserve.config import ConfigError
    from quantserve.serve.proxy import run_proxy as serve_proxy

    require_positive(ns, "server_port", "health_interval")
    for url in ns.nodes:
        if not is_url(url):
            raise ConfigError(f"{url} is not an http(s):// URL", field="nodes")
    setup_logging(ns)
    serve_proxy(ns.server_name, ns.server_port, ns.routing_strategy, ns.health_interval, ns.api_keys, ns.nodes,
                ns.log_level)
    return 0


def setup_logging(ns) -> None:
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def require_positive(ns, *flags: str) -> None:
    """A one-line error naming the first flag that is not > 0."""
    from quantserve.config import ConfigError

    for flag in flags:
        if getattr(ns, flag) <= 0:
            raise ConfigError(f"must be > 0, got {getattr(ns, flag)}", field=flag)


def is_url(text: str | None) -> bool:
    return bool(text) and text.startswith(("http://", "https://"))


def run_api_server(ns, with_ui: bool = False) -> int:
    from quantserve.config import ConfigError, ServerConfig
    from quantserve.serve.server import run_server

    setup_logging(ns)
    check_server_flags(ns)
    models = served_models(ns)
    ns.enable_prefix_caching = ns.enable_prefix_caching or not ns.disable_prefix_caching
    server = ServerConfig(models[0][0], limits=limits_from(ns), connections=connections_from(ns), **server_fields(ns))
    if server.overflow_model is not None and server.overflow_model not in dict(models):
        raise ConfigError(f"'{server.overflow_model}' is not one of the models served: "
                          f"{', '.join(name for name, _ in models)}", field="overflow_model")
    check_lora_modules(server.lora_modules, models)
    run_server(models, engine_config(ns), server, ns.server_name, ns.server_port, ns.chat_template,
               ns.tool_call_parser, ns.log_level, ns.ssl, ns.ssl_keyfile, ns.ssl_certfile, with_ui,
               getattr(ns, "proxy_url", None))
    return 0


def check_lora_modules(loras, models: list[tuple[str, str | None]]) -> None:
    """Every --lora-modules entry adapts a served model and has a name of its own."""
    from quantserve.config import ConfigError

    served = dict(models)
    for m in loras:
        if m.name in served:
            raise ConfigError(f"'{m.name}' names both a model and a LoRA adapter", field="lora_modules")
        if m.base_model_name is not None and m.base_model_name not in served:
            raise ConfigError(f"the LoRA adapter '{m.name}' adapts '{m.base_model_name}', which is not served "
                              f"(served: {', '.join(served)})", field="lora_modules")


def server_fields(ns) -> dict:
    """ServerConfig's fields from the server flags (all but the model's name and the limits)."""
    from quantserve.config import ServerConfig

    return {**config_values(ns, ServerConfig), "grpc_host": ns.server_name}


def run_ray(ns) -> int:
    import dataclasses

    from quantserve.config import ConfigError
    from quantserve.models.resolve import resolve_model

    setup_logging(ns)
    check_server_flags(ns)
    require_positive(ns, "num_replicas", "max_ongoing_requests", "cpus_per_replica")
    if ns.autoscale and not (0 <= ns.autoscale[0] <= ns.autoscale[1] and ns.autoscale[1] > 0):
        raise ConfigError(f"needs 0 <= MIN <= MAX and MAX > 0, got {' '.join(map(str, ns.autoscale))}",
                          field="autoscale")
    models = served_models(ns)
    if len(models) != 1:
        raise ConfigError(f"serves one model, got {len(models)}", field="model_path")
    (name, path), = models
    try:
        from quantserve.serve.ray_app import ReplicaSpec, run
    except ImportError as e:
        raise ConfigError(f"needs Ray Serve ({e}): pip install 'quantserve[ray]'") from None
    ns.enable_prefix_caching = ns.enable_prefix_caching or not ns.disable_prefix_caching
    engine = engine_config(ns)
    if engine.num_threads is None:
        engine = dataclasses.replace(engine, num_threads=max(1, int(ns.cpus_per_replica)))
    spec = ReplicaSpec(name, str(resolve_model(path)), dataclasses.asdict(engine), server_fields(ns),
                       dataclasses.asdict(limits_from(ns)))
    run(spec, ns.server_name, ns.server_port, ns.ray_address, num_replicas=ns.num_replicas,
        autoscale=tuple(ns.autoscale) if ns.autoscale else None, cpus_per_replica=ns.cpus_per_replica,
        max_ongoing_requests=ns.max_ongoing_requests, max_queued_requests=ns.max_queued_requests)
    return 0


def limits_from(ns):
    from quantserve.config import Limits

    return Limits(**config_values(ns, Limits))


def check_server_flags(ns) -> None:
    from quantserve.config import ConfigError

    require_positive(ns, "max_concurrent_requests", "max_queued_requests", "max_body_size", "max_n", "server_port",
                     "default_max_tokens", "max_stored_responses")
    if ns.rate_limit is not None and ns.rate_limit <= 0:
        raise ConfigError("must be > 0", field="rate_limit")
    if ns.ssl and not (ns.ssl_certfile and ns.ssl_keyfile):
        raise ConfigError("needs --ssl-certfile and --ssl-keyfile (or SSL_CERTFILE / SSL_KEYFILE)", field="ssl")
    models_dir = getattr(ns, "models_dir", None)
    if models_dir and not os.path.isdir(models_dir):
        raise ConfigError(f"{models_dir} is not a directory", field="models_dir")
    grpc_port = getattr(ns, "grpc_port", None)
    if grpc_port is not None and not (0 < grpc_port < 65536 and grpc_port != ns.server_port):
        raise ConfigError(f"must be a free port in 1..65535 other than --server-port, got {grpc_port}",
                          field="grpc_port")


def served_models(ns) -> list[tuple[str, str | None]]:
    """(name, path) of every model to serve: the paths given (a directory of models counts as
    each model in it), named by --model-name or by their directory; none: the default model."""
    from quantserve.config import ConfigError
    from quantserve.serve.server import default_model_name

    paths = ns.model_path if isinstance(ns.model_path, list) else [ns.model_path] if ns.model_path else []
    for path in paths:
        if not os.path.exists(path):
            raise ConfigError(f"the model path {path} does not exist")
    paths = [p for path in paths for p in expand_models_dir(path)] or [None]
    names = ns.model_name or [default_model_name(p) for p in paths]
    if len(names) != len(paths):
        raise ConfigError(f"{len(names)} names for {len(paths)} models", field="model_name")
    if len(set(names)) != len(names):
        raise ConfigError(f"names must differ, got {' '.join(names)}", field="model_name")
    return list(zip(names, paths))


def expand_models_dir(path: str) -> list[str]:
    """A directory without config.json whose subdirectories are models stands for those models."""
    from pathlib import Path

    p = Path(path)
    if not p.is_dir() or (p / "config.json").exists():
        return [path]
    inside = sorted(str(c) for c in p.iterdir() if (c / "config.json").is_file() or c.suffix.lower() == ".gguf")
    return inside or [path]
