"""Flag groups shared by the subcommands, with LMDeploy's names and defaults, and their
conversion to EngineConfig / GenerationConfig. Nothing below the CLI sees argparse."""
from __future__ import annotations

import argparse
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


def fraction_or_size(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def quant_policy(text: str) -> int:
    names = {"none": 0, "int8": 8, "int4": 4, "0": 0, "8": 8, "4": 4}
    if text.lower() not in names:
        raise argparse.ArgumentTypeError(f"choose from 0/none, 8/int8, 4/int4 (got {text!r})")
    return names[text.lower()]


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default=None,
                   help="model directory, .gguf file, or nothing for the default model (SmolLM2-135M-Instruct)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--backend", default="pytorch", choices=["pytorch", "turbomind"],
                   help="accepted for LMDeploy compatibility; both run quantserve's engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--tp", type=int, default=1, help="tensor parallelism (only 1 in this build)")
    g.add_argument("--session-len", type=int, default=None, help="max tokens of one conversation (default: the model's context)")
    g.add_argument("--max-batch-size", type=int, default=None, help="max running sequences (default 16 on CPU)")
    g.add_argument("--cache-max-entry-count", type=fraction_or_size, default=0.8,
                   help="KV cache budget: a fraction of the memory free after loading the weights, or a size (2GiB)")
    g.add_argument("--cache-max-tokens", type=int, default=None,
                   help="KV cache size in tokens (replaces --cache-max-entry-count)")
    g.add_argument("--cache-block-seq-len", type=int, default=64, help="tokens per KV cache block")
    g.add_argument("--max-prefill-token-num", type=int, default=8192, help="tokens per step (chunked prefill)")
    g.add_argument("--quant-policy", type=quant_policy, default=None,
                   help="KV cache quantization: 0/none, 8/int8, 4/int4 (per head, per token, asymmetric; static with a "
                        "directory's kv_qparams.safetensors). Default: the directory's config.ini, else 0")
    g.add_argument("--enable-prefix-caching", action="store_true")
    g.add_argument("--model-format", default=None, help="hf or gguf (detected when omitted)")
    g.add_argument("--quantization", "-q", default=None, type=str.lower,
                   help="awq, gptq, gguf: checked against the checkpoint; w8a8, w4a16: round a float model to 8 or "
                        "4 bits at load (data-free); none: as the checkpoint says")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--chat-template", default=None, help="built-in name (chatml, internlm2, base) or a Jinja/JSON file")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--rope-scaling-factor", type=float, default=0.0,
                   help="dynamic NTK RoPE scaling factor, so --session-len can exceed the model's context")
    g.add_argument("--hf-overrides", type=json_dict, default=None,
                   help='JSON merged into config.json, e.g. \'{"rope_scaling": {"rope_type": "yarn", "factor": 4}}\'')
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--head-bits", type=int, default=8, choices=[4, 8],
                   help="bits of the output head of weight-quantized models (4 reads half the bytes per step)")
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


ENGINE_FIELDS = ("dtype", "tp", "session_len", "max_batch_size", "cache_max_entry_count", "cache_max_tokens",
                 "cache_block_seq_len", "max_prefill_token_num", "quant_policy", "device",
                 "enable_prefix_caching", "model_format", "trust_remote_code", "num_threads",
                 "rope_scaling_factor", "hf_overrides", "head_bits", "quantization")


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f: getattr(ns, f) for f in ENGINE_FIELDS})


def generation_config(ns: argparse.Namespace, defaults: GenerationConfig) -> GenerationConfig:
    """Explicit sampling flags over the model's defaults."""
    return defaults.updated(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
                            repetition_penalty=ns.repetition_penalty, max_new_tokens=ns.max_new_tokens,
                            random_seed=ns.seed)
