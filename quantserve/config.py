"""Configuration objects, each validating itself.

`EngineConfig` and `GenerationConfig` are the public, LMDeploy-shaped objects (field names match
LMDeploy's so code written for it runs unchanged). `SamplingParams` is what the engine sees for
one request: token ids only, no text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
SUPPORTED_DEVICES = ("cpu", "cuda")
SUPPORTED_MODEL_FORMATS = (None, "hf", "gguf", "awq", "gptq")
# vLLM's --quantization: a checked claim about the checkpoint, or (w8a8, w4a16) a data-free
# round-to-nearest of a float one at load
SUPPORTED_QUANTIZATION = (None, "none", "awq", "gptq", "gguf", "smooth_quant", "w8a8", "w4a16")
GPU_ONLY_QUANTIZATION = ("fp8", "fbgemm_fp8", "marlin", "gptq_marlin", "gptq_marlin_24", "awq_marlin", "bitsandbytes",
                         "aqlm", "deepspeedfp", "tpu_int8", "modelopt", "compressed-tensors", "experts_int8", "qqq",
                         "neuron_quant")


class ConfigError(ValueError):
    """A configuration or request value is invalid; `field` names it (the CLI shows the flag)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message, field=message.split(" ", 1)[0].split("=", 1)[0])


SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """'24GB' -> 24e9, '2GiB' -> 2 * 2**30, '512M' -> 512e6 bytes."""
    m = SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 24GB, 2GiB, 512MB)")
    power = " kmgt".index(m.group(2).lower() or " ")
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


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

    dtype: str = "auto"
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float | str = 0.8      # fraction of free memory, or a size: "2GiB"
    cache_max_tokens: int | None = None
    cache_block_seq_len: int = 64
    max_prefill_token_num: int = 8192
    quant_policy: int | None = None               # None: the model directory's config.ini, else 0
    device: str = "cpu"
    enable_prefix_caching: bool = False
    model_format: str | None = None
    trust_remote_code: bool = False
    num_threads: int | None = None
    rope_scaling_factor: float = 0.0              # > 0: dynamic NTK RoPE scaling by this factor
    hf_overrides: dict | None = None              # merged into the model's config.json
    head_bits: int = 8                            # output head of weight-quantized models: 8 or 4 bits
    quantization: str | None = None               # SUPPORTED_QUANTIZATION

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
    guide: object | None = field(default=None, compare=False)   # has start() -> a per-request Guide
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
