"""`quantserve <command>`: one entry point; each command's module is imported only when used."""
from __future__ import annotations

import importlib
import sys

from quantserve.cli.args import FlexibleParser

COMMANDS = {
    "chat": ("quantserve.cli.chat", "interactive chat in the terminal (one turn per line when piped)"),
    "serve": ("quantserve.cli.serve", "serve a model: OpenAI-compatible api_server, and api_client"),
    "lite": ("quantserve.cli.lite", "quantize weights (auto_awq, auto_gptq, rtn); static KV (calibrate, kv_qparams)"),
    "convert": ("quantserve.cli.convert", "a deployment workspace: the weights prepacked as the kernels run them"),
    "eval": ("quantserve.cli.eval", "evaluate a model: perplexity on WikiText-2 or PTB through the engine"),
    "bench": ("quantserve.cli.bench", "benchmark: engine throughput and latency, or any OpenAI-compatible server"),
    "mem": ("quantserve.cli.mem", "memory calculator: weights, KV cache, other; inference and training"),
    "default-model": ("quantserve.cli.default_model", "print the path of the default model, preparing it offline"),
}


def build_parser() -> FlexibleParser:
    parser = FlexibleParser(prog="quantserve", description="Run quantized LLMs on the machine you have.")
    parser.add_argument("-v", "--version", action="version", version="quantserve 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from quantserve.config import ConfigError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return importlib.import_module(ns.module).run(ns) or 0
    except ConfigError as e:
        flag = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"quantserve {ns.command}: error: {flag}{e}", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"quantserve {ns.command}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
