"""Flag groups shared by the subcommands, with LMDeploy's names and defaults, and their
conversion to EngineConfig / GenerationConfig. Nothing below the CLI sees argparse."""
from __future__ import annotations

import argparse
import dataclasses
import re

from quantserve.config import EngineConfig, GenerationConfig


BACKEND_WORDS = ("turbomind", "pytorch")     # LMDeploy's `chat turbomind MODEL`
QUOTES = {"\u2018": "\u2019", "\u201c": "\u201d", "'": "'", '"': '"'}


class FlexibleParser(argparse.ArgumentParser):
    """Accepts `--foo_bar` as `--foo-bar` (LMDeploy and vLLM do the same), values pasted with
    their quotes, and LMDeploy's backend word after `chat`."""

    def parse_args(self, args=None, namespace=None):
        import sys

        argv = [normalize_flag(a) for a in (sys.argv[1:] if args is None else list(args))]
        if len(argv) > 2 and argv[0] == "chat" and argv[1] in BACKEND_WORDS:
            print(f"quantserve chat: '{argv[1]}' names an LMDeploy backend; quantserve's own engine runs the model",
                  file=sys.stderr)
            argv[1:2] = ["--backend", argv[1]]
        return super().parse_args(argv, namespace)


def normalize_flag(arg: str) -> str:
    """`--foo_bar` -> `--foo-bar`; a flag pasted from a web page with an en or em dash
    (`–quant-policy`) -> `--quant-policy`; a value in quotes, straight or curly (`‘ptb’`) ->
    the bare word."""
    if arg[:1] in ("\u2013", "\u2014"):
        arg = "--" + arg[1:]
    if len(arg) >= 2 and QUOTES.get(arg[0]) == arg[-1]:
        return arg[1:-1]
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return re.sub("_", "-", name) + eq + normalize_flag(value) if eq else re.sub("_", "-", name)


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value in ("true", "1", "yes")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None,
                   help="model directory, .gguf file, or nothing for the default model (SmolLM2-135M-Instruct)")


def add_config_args(g, cls, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """A flag for each field of the config dataclass `cls` declared with config.flag(): its name,
    default, help and type come from the field, so they are written once, in config.py."""
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get("flag") or {})
        if not spec or (only is not None and f.name not in only) or f.name in skip:
            continue
        names = spec.pop("names") or (f"--{f.name.replace('_', '-')}",)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if spec.get("type") not in (None, int, float, str):
            spec["type"] = argparse_type(spec["type"])
        g.add_argument(*names, dest=dest_of(f), default=default, **spec)


def dest_of(f: dataclasses.Field) -> str:
    """The namespace attribute of a field's flag: named after the flag, so errors name the flag."""
    names = f.metadata["flag"]["names"]
    return names[0].lstrip("-").replace("-", "_") if names else f.name


def config_values(ns: argparse.Namespace, cls) -> dict:
    """The flagged fields of `cls` that this subcommand's flags set."""
    flagged = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
    return {f.name: getattr(ns, dest_of(f)) for f in flagged if hasattr(ns, dest_of(f))}


def argparse_type(parse):
    """A config parser (raising ValueError) as an argparse type whose message is shown."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--backend", default="pytorch", choices=["pytorch", "turbomind"],
                   help="accepted for LMDeploy compatibility; both run quantserve's engine")
    add_config_args(g, EngineConfig)
    g.add_argument("--chat-template", default=None, help="built-in name (chatml, internlm2, base) or a Jinja/JSON file")
    g.add_argument("--log-level", default="WARNING")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the model's generation_config.json (see GenerationConfig.from_model)."""
    g = p.add_argument_group("sampling (default: the model's generation_config.json)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--seed", type=int, default=None)


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**config_values(ns, EngineConfig))


def generation_config(ns: argparse.Namespace, defaults: GenerationConfig) -> GenerationConfig:
    """Explicit sampling flags over the model's defaults."""
    return defaults.updated(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
                            repetition_penalty=ns.repetition_penalty, max_new_tokens=ns.max_new_tokens,
                            random_seed=ns.seed)
