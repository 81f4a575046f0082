"""Configuration objects, each validating itself, and the one place their flags are declared.

`EngineConfig` and `GenerationConfig` are the public, LMDeploy-shaped objects (field names match
LMDeploy's so code written for it runs unchanged). `SamplingParams` is what the engine sees for
one request: token ids only, no text. `ServerConfig`, `Limits` and `ConnectionLimits` configure the
server. A field declared with `metadata=flag(help, ...)` is a command-line flag: cli/args.py makes
the flag from the field (name, default, help, type), so each is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from quantserve.values import fraction_or_size, json_object, parse_duration, parse_size, quant_policy

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
SUPPORTED_DEVICES = ("cpu", "cuda")
SUPPORTED_MODEL_FORMATS = (None, "hf", "gguf", "awq", "gptq")
# vLLM's --quantization: a checked claim about the checkpoint, or (w8a8, w4a16) a data-free
# round-to-nearest of a float one at load
SUPPORTED_QUANTIZATION = (None, "none", "awq", "gptq", "gguf", "smooth_quant", "w8a8", "w4a16")
GPU_ONLY_QUANTIZATION = ("fp8", "fbgemm_fp8", "marlin", "gptq_marlin", "gptq_marlin_24", "awq_marlin", "bitsandbytes",
                         "aqlm", "deepspeedfp", "tpu_int8", "modelopt", "compressed-tensors", "experts_int8", "qqq",
                         "neuron_quant")
SUPPORTED_SPECULATIVE = (None, "ngram", "draft_model")
# vLLM's --speculative-config keys -> EngineConfig fields
SPECULATIVE_CONFIG_KEYS = {"method": "speculative", "model": "speculative_model",
                           "num_speculative_tokens": "num_speculative_tokens",
                           "prompt_lookup_max": "prompt_lookup_max", "prompt_lookup_min": "prompt_lookup_min",
                           "disable_by_batch_size": "speculative_disable_by_batch_size", "draft_p_min": "draft_p_min"}


class ConfigError(ValueError):
    """A configuration or request value is invalid; `field` names it (the CLI shows the flag)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message, field=message.split(" ", 1)[0].split("=", 1)[0])


def flag(help: str, *names: str, **argparse_options) -> dict:
    """A field's command-line flag: its help, and argparse options beyond the field's own name
    (--field-name), default and type."""
    return {"flag": {"help": help, "names": names, **argparse_options}}


@dataclass(frozen=True)
class LoRAModule:
    """A LoRA adapter the server serves from the start under its own model name."""

    name: str
    path: str
    base_model_name: str | None = None      # the served model it adapts (None: the first one)


def lora_module(text: str) -> LoRAModule:
    """vLLM's --lora-modules entry: name=path, or {"name": ..., "path": ..., "base_model_name": ...}."""
    if text.strip().startswith("{"):
        value = json_object(text)
        if not all(isinstance(value.get(k), str) and value[k] for k in ("name", "path")) or \
                not isinstance(value.get("base_model_name", ""), (str, type(None))):
            raise ValueError(f"a JSON entry needs string name and path (and maybe base_model_name), got {text!r}")
        return LoRAModule(value["name"], value["path"], value.get("base_model_name"))
    name, eq, path = text.partition("=")
    if not (eq and name and path):
        raise ValueError(f"expected name=path or a JSON object, got {text!r}")
    return LoRAModule(name, path)


def _is_fraction_or_size(value) -> bool:
    if isinstance(value, (int, float)):
        return 0 < value <= 1
    try:
        return parse_size(value) > 0
    except ValueError:
        return False


@dataclass
class EngineConfig:
    """How the engine runs a model (LMDeploy's PytorchEngineConfig names)."""

    dtype: str = field(default="auto", metadata=flag("weights' compute type", choices=SUPPORTED_DTYPES))
    tp: int = field(default=1, metadata=flag("tensor parallelism (only 1 in this build)", type=int))
    session_len: int | None = field(default=None, metadata=flag(
        "max tokens of one conversation (default: the model's context)", type=int))
    max_batch_size: int | None = field(default=None, metadata=flag("max running sequences (default 16 on CPU)",
                                                                    type=int))
    cache_max_entry_count: float | str = field(default=0.8, metadata=flag(   # fraction of free memory, or "2GiB"
        "KV cache budget: a fraction of the memory free after loading the weights, or a size (2GiB)",
        type=fraction_or_size))
    cache_max_tokens: int | None = field(default=None, metadata=flag(
        "KV cache size in tokens (replaces --cache-max-entry-count)", type=int))
    cache_block_seq_len: int = field(default=64, metadata=flag("tokens per KV cache block", type=int))
    max_prefill_token_num: int = field(default=8192, metadata=flag("tokens per step (chunked prefill)", type=int))
    quant_policy: int | None = field(default=None, metadata=flag(   # None: the directory's config.ini, else 0
        "KV cache quantization: 0/none, 8/int8, 4/int4 (per head, per token, asymmetric; static with a "
        "directory's kv_qparams.safetensors). Default: the directory's config.ini, else 0", type=quant_policy))
    device: str = field(default="cpu", metadata=flag("where the model runs", choices=SUPPORTED_DEVICES))
    enable_prefix_caching: bool = field(default=False, metadata=flag(
        "reuse the KV blocks of prompts' shared prefixes", action="store_true"))
    model_format: str | None = field(default=None, metadata=flag("hf or gguf (detected when omitted)"))
    trust_remote_code: bool = field(default=False, metadata=flag("accepted: local tokenizer code is trusted",
                                                                 action="store_true"))
    num_threads: int | None = field(default=None, metadata=flag("CPU threads (default: all cores)", type=int))
    rope_scaling_factor: float = field(default=0.0, metadata=flag(   # > 0: dynamic NTK RoPE scaling by this factor
        "dynamic NTK RoPE scaling factor, so --session-len can exceed the model's context", type=float))
    hf_overrides: dict | None = field(default=None, metadata=flag(   # merged into the model's config.json
        'JSON merged into config.json, e.g. \'{"rope_scaling": {"rope_type": "yarn", "factor": 4}}\'',
        type=json_object))
    head_bits: int = field(default=8, metadata=flag(   # output head of weight-quantized models: 8 or 4 bits
        "bits of the output head of weight-quantized models (4 reads half the bytes per step)", type=int,
        choices=[4, 8]))
    max_loras: int = field(default=8, metadata=flag(
        "LoRA adapters loaded at once (each may serve any rows of any batch)", type=int))
    max_lora_rank: int = field(default=64, metadata=flag("highest LoRA rank an adapter may have", type=int))
    quantization: str | None = field(default=None, metadata=flag(   # SUPPORTED_QUANTIZATION
        "awq, gptq, gguf: checked against the checkpoint; w8a8, w4a16: round a float model to 8 or 4 bits at "
        "load (data-free); none: as the checkpoint says", "--quantization", "-q", type=str.lower))
    speculative: str | None = field(default=None, metadata=flag(   # SUPPORTED_SPECULATIVE
        "speculative decoding, outputs unchanged: ngram drafts a request's next tokens from its own prompt and "
        "output (prompt lookup); draft_model from --speculative-model (default: off, or draft_model when "
        "--speculative-model is given)", choices=["ngram", "draft_model"]))
    speculative_model: str | None = field(default=None, metadata=flag(
        "a small model of the same vocabulary that drafts (a directory or .gguf), e.g. a 4-bit copy or a "
        "smaller sibling", "--speculative-model", "--model-draft"))
    num_speculative_tokens: int = field(default=4, metadata=flag("tokens drafted per step (K)", type=int))
    prompt_lookup_max: int = field(default=4, metadata=flag("longest n-gram searched for a draft", type=int))
    prompt_lookup_min: int = field(default=1, metadata=flag("shortest n-gram searched for a draft", type=int))
    speculative_disable_by_batch_size: int = field(default=4, metadata=flag(
        "no drafts in a step with more decoding requests than this (a full batch gains nothing)", type=int))
    draft_p_min: float = field(default=0.0, metadata=flag(
        "a draft model stops drafting when its next token's probability is below this", type=float))
    speculative_config: dict | None = field(default=None, metadata=flag(   # applied to the fields above
        'vLLM\'s JSON form, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' or \'{"model": PATH}\'',
        type=json_object))

    def model_overrides(self) -> dict:
        """Config entries to override: --hf-overrides, and --rope-scaling-factor as dynamic NTK."""
        overrides = dict(self.hf_overrides or {})
        if self.rope_scaling_factor > 0:
            overrides["rope_scaling"] = {"rope_type": "dynamic", "factor": self.rope_scaling_factor}
        return overrides

    def __post_init__(self) -> None:
        _check(self.dtype in SUPPORTED_DTYPES, f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        _check(self.tp == 1, f"tp={self.tp} is not supported by this build: quantserve runs one process per model (use tp 1)")
        _check(self.session_len is None or self.session_len > 0, "session_len must be > 0")
        _check(self.max_batch_size is None or self.max_batch_size > 0, "max_batch_size must be > 0")
        _check(_is_fraction_or_size(self.cache_max_entry_count),
               f"cache_max_entry_count must be a fraction in (0, 1] or a size like 2GiB, got {self.cache_max_entry_count!r}")
        _check(self.cache_max_tokens is None or self.cache_max_tokens > 0, "cache_max_tokens must be > 0")
        _check(self.cache_block_seq_len > 0, "cache_block_seq_len must be > 0")
        _check(self.max_prefill_token_num > 0, "max_prefill_token_num must be > 0")
        _check(self.quant_policy in (None, 0, 4, 8), f"quant_policy must be 0 (none), 4 (int4) or 8 (int8), got {self.quant_policy}")
        _check(self.device in SUPPORTED_DEVICES, f"device must be one of {SUPPORTED_DEVICES}, got {self.device!r}")
        _check(self.rope_scaling_factor >= 0, "rope_scaling_factor must be >= 0")
        _check(self.head_bits in (4, 8), f"head_bits must be 4 or 8, got {self.head_bits}")
        _check(self.max_loras > 0, f"max_loras must be > 0, got {self.max_loras}")
        _check(self.max_lora_rank > 0, f"max_lora_rank must be > 0, got {self.max_lora_rank}")
        _check(self.model_format in SUPPORTED_MODEL_FORMATS,
               f"model_format {self.model_format!r} is not supported; supported: hf, gguf, awq, gptq")
        if self.quantization is not None:
            self.quantization = self.quantization.lower()
        _check(self.quantization not in GPU_ONLY_QUANTIZATION,
               f"quantization {self.quantization} runs on GPUs only; on a CPU quantserve runs awq, gptq, gguf, "
               "w8a8 and w4a16 (the last two quantize a float model at load)")
        _check(self.quantization in SUPPORTED_QUANTIZATION,
               f"quantization {self.quantization!r} is not supported; supported: awq, gptq, gguf, smooth_quant, w8a8, "
               "w4a16, none")
        self._apply_speculative_config()
        _check(self.speculative in SUPPORTED_SPECULATIVE,
               f"speculative must be one of {SUPPORTED_SPECULATIVE[1:]}, got {self.speculative!r}")
        _check(self.num_speculative_tokens > 0, "num_speculative_tokens must be > 0")
        _check(0 < self.prompt_lookup_min <= self.prompt_lookup_max,
               "prompt_lookup_min must be > 0 and <= prompt_lookup_max")
        _check(self.speculative_disable_by_batch_size >= 0, "speculative_disable_by_batch_size must be >= 0")
        _check((self.speculative == "draft_model") == bool(self.speculative_model),
               "speculative_model is what --speculative draft_model drafts with: give both or neither "
               f"(got speculative={self.speculative!r}, speculative_model={self.speculative_model!r})")
        _check(0 <= self.draft_p_min < 1, "draft_p_min must be in [0, 1)")

    def _apply_speculative_config(self) -> None:
        """--speculative-config's keys onto their fields; a model alone means method draft_model."""
        spec = dict(self.speculative_config or {})
        unknown = sorted(set(spec) - set(SPECULATIVE_CONFIG_KEYS))
        _check(not unknown, f"speculative_config has unknown keys {unknown}; known: {sorted(SPECULATIVE_CONFIG_KEYS)}")
        for key, value in spec.items():
            kind, name = {"method": (str, "a string"), "model": (str, "a string"),
                          "draft_p_min": ((int, float), "a number")}.get(key, (int, "an integer"))
            _check(isinstance(value, kind) and not isinstance(value, bool),
                   f"speculative_config {key!r} must be {name}, got {value!r}")
            setattr(self, SPECULATIVE_CONFIG_KEYS[key], value)
        if self.speculative_model and self.speculative is None:
            self.speculative = "draft_model"


@dataclass
class GenerationConfig:
    """Per-request generation settings (LMDeploy's GenerationConfig names)."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(self.n == 1, "n > 1 is not supported by pipeline(); send the prompt n times")
        _check(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.min_new_tokens is None or self.min_new_tokens >= 0, "min_new_tokens must be >= 0")

    def to_sampling_params(self, eos_token_ids: list[int], **engine_fields) -> SamplingParams:
        """What the engine runs; `engine_fields` are SamplingParams' own (logit_bias, logprobs,
        guide, seed) that have no GenerationConfig name."""
        greedy = not self.do_sample or self.temperature == 0 or self.top_k == 1
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.random_seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            eos_token_ids=() if self.ignore_eos else tuple(eos_token_ids),
            min_new_tokens=self.min_new_tokens or 0,
            **engine_fields,
        )

    @classmethod
    def from_model(cls, model_dir, **fallback) -> GenerationConfig:
        """The model's generation_config.json sampling defaults (as LMDeploy's --generation-config
        auto), else `fallback`."""
        from pathlib import Path

        from quantserve.models.loader import read_json

        path = Path(model_dir) / "generation_config.json"
        saved = read_json(path) if path.is_file() else {}
        keys = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        found = {k: saved[k] for k in keys if saved.get(k) is not None}
        return cls(**(found if "temperature" in found or "do_sample" in found else fallback))

    def updated(self, **changes) -> GenerationConfig:
        """The one rule for defaults and what a request (or a CLI flag) sets: every field given
        (not None) replaces the default, and a temperature given decides greedy (0) or sampled,
        whatever the model's do_sample says."""
        known = {f.name for f in fields(self)}
        chosen = {k: v for k, v in changes.items() if k in known and v is not None}
        if "temperature" in chosen and "do_sample" not in chosen:
            chosen["do_sample"] = chosen["temperature"] > 0
        return replace(self, **chosen)


@dataclass(frozen=True)
class SamplingParams:
    """What the engine needs to pick tokens for one request. temperature 0 = greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    logprobs: int | None = None                      # None: off; k: the sampled token's + top k
    priority: int = 0                                # scheduling order: lower first (vLLM's priority)
    guide: object | None = field(default=None, compare=False)   # has start() -> a per-request Guide
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Limits:
    """What one request, and all of them together, may ask of a served model."""

    max_n: int = field(default=16, metadata=flag("largest n per request", type=int))
    max_sequences: int = 64                # prompts x n in one completions request
    max_stops: int = 16
    max_stop_len: int = 256
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=flag(
        "largest request body in bytes (413 past it)", "--max-body-size", type=int))
    max_concurrent_requests: int = field(default=64, metadata=flag("requests generating at once", type=int))
    max_queued_requests: int = field(default=256, metadata=flag(
        "requests waiting for a slot; past this a request gets 429 with Retry-After", type=int))
    rate_limit: int | None = field(default=None, metadata=flag(
        "requests per minute per API key (or client address)", type=int))
    request_timeout: float | None = field(default=None, metadata=flag(
        "seconds a chat, completions, Responses or Messages request may take, queued or generating, unless "
        "it sets `timeout`; past it a 408 and its generation is aborted (default: none)", type=float))

    def __post_init__(self) -> None:
        for name in ("max_n", "max_body_bytes", "max_concurrent_requests"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.max_queued_requests >= 0, f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        _check(self.rate_limit is None or self.rate_limit > 0, f"rate_limit must be > 0, got {self.rate_limit}")
        _check(self.request_timeout is None or self.request_timeout > 0,
               f"request_timeout must be > 0, got {self.request_timeout}")


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client's connection may hold (uvicorn's names where it has them)."""

    timeout_keep_alive: float = field(default=5.0, metadata=flag(   # uvicorn's default
        "an idle connection (before its first request or between two) is closed after this (default: %(default)g)",
        type=float, metavar="SECONDS"))
    timeout_request_read: float = field(default=30.0, metadata=flag(
        "a request's headers, and then its body, must each arrive within this; 408 past it (default: %(default)g)",
        type=float, metavar="SECONDS"))
    max_header_size: int = field(default=16 * 1024, metadata=flag(   # h11's default
        "largest request line + headers; 431 past it (default: %(default)d)", type=int, metavar="BYTES"))
    # open connections: 64 running + 256 queued requests (the default admission limits) and room
    # for idle keep-alive sockets; each costs a few KB, and the idle ones close after 5 s
    limit_concurrency: int = field(default=512, metadata=flag(
        "open connections at most; a request on one more gets 503 and is closed (default: %(default)d)",
        type=int, metavar="N"))

    def __post_init__(self) -> None:
        _check(self.timeout_keep_alive > 0, f"timeout_keep_alive must be > 0, got {self.timeout_keep_alive}")
        _check(self.timeout_request_read > 0, f"timeout_request_read must be > 0, got {self.timeout_request_read}")
        _check(self.max_header_size >= 1024, f"max_header_size must be >= 1024, got {self.max_header_size}")
        _check(self.limit_concurrency > 0, f"limit_concurrency must be > 0, got {self.limit_concurrency}")


REASONING_PARSERS = ("qwen3", "deepseek_r1", "deepseek-r1", "qwen-qwq")   # LMDeploy's and vLLM's names


@dataclass
class ServerConfig:
    """What the API server does around its models."""

    model_name: str
    api_keys: list[str] = field(default_factory=list, metadata=flag(
        "accepted Bearer (or x-api-key) keys (default: no authentication)", nargs="*"))
    allow_origins: list[str] = field(default_factory=lambda: ["*"], metadata=flag("CORS origins", nargs="*"))
    allow_credentials: bool = field(default=False, metadata=flag("CORS: allow credentials", action="store_true"))
    allow_methods: list[str] = field(default_factory=lambda: ["*"], metadata=flag("CORS methods", nargs="*"))
    allow_headers: list[str] = field(default_factory=lambda: ["*"], metadata=flag("CORS headers", nargs="*"))
    limits: Limits = field(default_factory=Limits)
    disable_docs: bool = field(default=False, metadata=flag("no /docs, /redoc or /openapi.json",
                                                            "--disable-fastapi-docs", action="store_true"))
    default_max_tokens: int = field(default=1024, metadata=flag(
        "output tokens when a request sets no max_tokens (capped by the context)", type=int))
    admin_api_keys: list[str] = field(default_factory=list, metadata=flag(
        "Bearer keys that may load, unload and reload models at run time (default: nobody)", nargs="*"))
    models_dir: str | None = field(default=None, metadata=flag(
        "directory whose subdirectories /v1/models/load finds by name"))
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)   # what a slow or idle client may hold
    pooling: str | None = field(default=None, metadata=flag(
        "serve /v1/embeddings from a decoder, pooling its final hidden states this way (default: as the model's "
        "sentence-transformers files say; encoders always embed)", choices=["last", "mean", "cls"]))
    reasoning_parser: str | None = field(default=None, metadata=flag(
        "split a thinking model's <think> ... </think> into reasoning_content (chat), reasoning items "
        "(Responses) and thinking blocks (Messages)", choices=REASONING_PARSERS))
    max_stored_responses: int = field(default=1024, metadata=flag(
        "/v1/responses answers kept in memory for previous_response_id (least recently used out)", type=int))
    grpc_port: int | None = field(default=None, metadata=flag(
        "also serve the gRPC API (quantserve.proto: Generate, Embed, Models; grpc.health.v1) on this port, "
        "plaintext, same models and keys (default: no gRPC)", type=int))
    grpc_host: str = "0.0.0.0"
    overflow_model: str | None = field(default=None, metadata=flag(
        "when a model's queue is full, answer its chat, completions and Messages requests with this model "
        "(served by the same server; the answer names it and carries x-quantserve-overflow); 429 only when "
        "it is full too"))
    keep_alive: float = field(default=float("inf"), metadata=flag(   # seconds; inf: never
        "unload a model (weights and KV cache) after it has had no request for this long, and load it again on "
        "the next one: 5m, 30s, 1h; 0: right after each request; -1: never (the default). A request's "
        "keep_alive sets it from then on", type=parse_duration, metavar="DURATION"))
    lora_modules: list[LoRAModule] = field(default_factory=list, metadata=flag(
        "LoRA adapters to serve, each under its own model name: name=path, or vLLM's JSON form "
        '\'{"name": "sql", "path": "/adapters/sql", "base_model_name": "m"}\' (default base: the first model)',
        nargs="+", type=lora_module, metavar="NAME=PATH"))
    enable_lora: bool = field(default=False, metadata=flag(   # vLLM's switch; adapters need none here
        "accepted as vLLM spells it; adapters load without it (--lora-modules, /v1/load_lora_adapter)",
        action="store_true"))
    step_timeout: float | None = field(default=None, metadata=flag(
        "restart a model's engine when one of its steps runs longer than this; its requests get a 503 "
        "(default: off; an engine whose worker dies is restarted regardless)", type=float, metavar="SECONDS"))

    def __post_init__(self) -> None:
        _check(self.default_max_tokens > 0, f"default_max_tokens must be > 0, got {self.default_max_tokens}")
        _check(self.max_stored_responses > 0, f"max_stored_responses must be > 0, got {self.max_stored_responses}")
        _check(self.keep_alive >= 0, f"keep_alive must be >= 0 seconds (inf: never), got {self.keep_alive}")
        _check(self.step_timeout is None or self.step_timeout > 0, f"step_timeout must be > 0, got {self.step_timeout}")
        names = [m.name for m in self.lora_modules]
        _check(len(set(names)) == len(names), f"lora_modules names each adapter once, got {names}")
