"""Memory arithmetic for inference and training, as the LMDeploy tutorials do it (GB = 1e9 bytes).

Inference: weights + KV cache + other, where the KV cache is `cache_max_entry_count` of the
memory left after the weights (LMDeploy's rule) and "other" is activations and buffers
(~1 GB on a GPU in the tutorials). Training: weights + gradients + optimizer states +
activations, for full fine-tuning or LoRA, with or without activation recomputation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

GB = 1e9
BYTES = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0}
COUNT_RE = re.compile(r"^\s*([0-9.]+)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parse_count(text: str) -> float:
    """'7B' -> 7e9, '135M' -> 135e6 parameters."""
    m = COUNT_RE.match(str(text))
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 7B, 1.8B, 135M)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]


@dataclass
class ModelShape:
    """What the arithmetic needs of a model; from config.json or given by hand."""

    params: float
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None

    @property
    def known(self) -> bool:
        return None not in (self.num_layers, self.num_kv_heads, self.head_dim)


def weight_bytes(params: float, dtype: str, w_bits: int = 16, group_size: int = 128) -> float:
    """Bytes of weights; quantized weights also pay a float16 scale and a 4-bit zero per group."""
    if w_bits >= 16:
        return params * BYTES[dtype]
    per_weight = w_bits / 8
    if group_size > 0:
        per_weight += (16 + 4) / 8 / group_size
    return params * per_weight


def kv_bytes_per_token(shape: ModelShape, dtype: str, quant_policy: int) -> float | None:
    """K and V of every layer for one token (quantized: 3 bytes of scale/zero per head and group;
    int4 keys have two groups, see kvcache/quant.py)."""
    if not shape.known:
        return None
    if quant_policy:
        from quantserve.kvcache.quant import bytes_per_head_token

        per_head = bytes_per_head_token(shape.head_dim, quant_policy, None)
    else:
        per_head = 2 * shape.head_dim * BYTES[dtype]
    return shape.num_layers * shape.num_kv_heads * per_head


@dataclass
class InferenceMemory:
    weights_gb: float
    vision_gb: float
    kv_cache_gb: float
    other_gb: float
    total_gb: float
    device_gb: float
    kv_bytes_per_token: float | None
    kv_tokens: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def inference_memory(shape: ModelShape, device_bytes: float, dtype: str = "bf16", w_bits: int = 16,
                     group_size: int = 128, quant_policy: int = 0, cache_max_entry_count: float = 0.8,
                     other_gb: float = 1.0, vision_params: float = 0.0) -> InferenceMemory:
    weights = weight_bytes(shape.params, dtype, w_bits, group_size)
    vision = vision_params * BYTES[dtype]          # vision towers stay in half precision (LMDeploy)
    free = device_bytes - weights - vision
    if free <= 0:
        raise ValueError(f"the weights ({(weights + vision) / GB:.1f} GB) do not fit in {device_bytes / GB:.1f} GB")
    kv = free * cache_max_entry_count
    per_token = kv_bytes_per_token(shape, dtype, quant_policy)
    tokens = int(kv // per_token) if per_token else None
    total = weights + vision + kv + other_gb * GB
    return InferenceMemory(weights / GB, vision / GB, kv / GB, other_gb, total / GB, device_bytes / GB,
                           per_token, tokens)


@dataclass
class TrainingMemory:
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    trainable_params: float

    def as_dict(self) -> dict:
        return asdict(self)


OPTIMIZER_BYTES = {"adam": 12.0, "adamw": 12.0, "adam8bit": 6.0, "sgd": 4.0}   # per trainable parameter


def activation_bytes(shape: ModelShape, batch: int, seq: int, recompute: bool) -> float:
    """Per Korthikanti et al. (2022), half-precision activations, no sequence parallelism:
    s*b*h*(34 + 5*a*s/h) bytes per layer, or 2*s*b*h (only each layer's input) with full
    recomputation."""
    if shape.hidden_size is None or shape.num_layers is None:
        raise ValueError("activation memory needs hidden_size, num_layers and num_heads (give a model or --layers etc.)")
    sbh = seq * batch * shape.hidden_size
    per_layer = 2 * sbh if recompute else sbh * (34 + 5 * (shape.num_heads or 1) * seq / shape.hidden_size)
    return per_layer * shape.num_layers


def lora_params(shape: ModelShape, rank: int, targets: int = 4) -> float:
    """LoRA adapters on `targets` square h x h projections per layer: rank * (h + h) each."""
    return shape.num_layers * targets * rank * 2 * shape.hidden_size


def training_memory(shape: ModelShape, dtype: str = "bf16", optimizer: str = "adam", method: str = "full",
                    lora_rank: int = 8, batch: int = 1, seq: int = 2048, recompute: bool = False,
                    w_bits: int = 16) -> TrainingMemory:
    weights = weight_bytes(shape.params, dtype, w_bits)
    trainable = shape.params if method == "full" else lora_params(shape, lora_rank)
    weights += 0 if method == "full" else trainable * BYTES[dtype]
    gradients = trainable * BYTES[dtype]
    optimizer_bytes = trainable * OPTIMIZER_BYTES[optimizer]
    acts = activation_bytes(shape, batch, seq, recompute)
    total = weights + gradients + optimizer_bytes + acts
    return TrainingMemory(weights / GB, gradients / GB, optimizer_bytes / GB, acts / GB, total / GB, trainable)


def shape_from_config(cfg: dict) -> ModelShape:
    """A ModelShape from an HF config.json (any supported family), parameters counted exactly."""
    from quantserve.models.loader import family_for

    args = family_for(cfg).model_args(cfg)
    return ModelShape(args.num_params(), args.num_layers, args.hidden_size, args.num_heads,
                      args.num_kv_heads, args.head_dim, args.vocab_size)
