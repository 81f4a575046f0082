"""Model directory -> CausalLM with weights, in the requested dtype.

config.json → family (models/families/, by HF `model_type`) → ModelArgs; checkpoint files (safetensors,
sharded or not, or pytorch_model*.bin) → family.convert_weights → internal names → CausalLM.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from quantserve.config import ConfigError
from quantserve.models.families import Family, registry
from quantserve.models.layers import CausalLM, ModelArgs, QuantizedEmbedding
from quantserve.models.ops import ops_for
from quantserve.models.rope import RotaryEmbedding
from quantserve.models.workspace import SIDE_FILES, has_runtime, load_runtime
from quantserve.quant.checkpoint import split_quantized
from quantserve.quant.linear import QuantLinear
from quantserve.quant.primitives import QuantizedWeight, QuantSpec



# config.json keys every family reads without a default: positive integers
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ModelLoadError(ValueError):
    """A model directory or checkpoint file is missing, corrupt or unsupported."""


def one_line(error: BaseException) -> str:
    """A library's error message on one line (the CLI prints one line per error)."""
    return " ".join(str(error).split()) or type(error).__name__


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ModelLoadError(f"{path} is not valid JSON: {one_line(e)}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} is not a JSON object (got {type(cfg).__name__})")
    if not isinstance(cfg.get("model_type", ""), str):
        raise ModelLoadError(f"{path}: model_type must be a string, got {cfg['model_type']!r}")
    if cfg.get("model_type") in registry():
        for key in REQUIRED_SIZES:  # checked here, where the file can be named, not deep in model_args
            value = cfg.get(key)
            if type(value) is not int or value < 1:
                raise ModelLoadError(f"{path}: {key} must be a positive integer, got {value!r}")
    return cfg


def family_for(cfg: dict) -> Family:
    model_type, families = cfg.get("model_type"), registry()
    if model_type not in families:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r}; supported model_types: {', '.join(sorted(families))}")
    return families[model_type]


def model_config(model_dir: Path, hf_overrides: dict | None = None) -> dict:
    """config.json with --hf-overrides merged in."""
    return {**read_config(model_dir), **(hf_overrides or {})}


def model_args(cfg: dict) -> ModelArgs:
    return family_for(cfg).model_args(cfg)


def checkpoint_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [model_dir / n for n in shard_names(index)]
    else:
        files = sorted(f for f in model_dir.glob("*.safetensors") if f.name not in SIDE_FILES) or \
            sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no weights (*.safetensors or pytorch_model*.bin) in {model_dir}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"checkpoint shard {f} is missing")
    return files


def shard_names(index: Path) -> list[str]:
    try:
        names = set(read_json(index)["weight_map"].values())
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError("weight_map values must be file names")
        return sorted(names)
    except (KeyError, TypeError, AttributeError) as e:  # JSON of another shape
        raise ModelLoadError(f"{index} is not a valid shard index ({type(e).__name__}: {one_line(e)})") from None


def read_checkpoint(files: list[Path], progress: bool) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading weights", disable=not progress or len(files) < 2, file=sys.stderr):
        weights.update(read_weights_file(f))
    return weights


def read_weights_file(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if f.suffix == ".safetensors":
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:  # the header is checked against the file's size before any read
            raise ModelLoadError(f"cannot read checkpoint file {f}: {one_line(e)}") from None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle or zip surfaces as many exception types
        raise ModelLoadError(f"cannot read checkpoint file {f}: {one_line(e)}") from None


def load_model(model_dir: Path, dtype: torch.dtype, device: str, max_positions: int,
               cfg: dict | None = None, progress: bool = True, head_bits: int = 8,
               quantize: QuantSpec | None = None) -> CausalLM:
    """Weights stored in `dtype`; activations (and the small norm weights) in float32 on CPU,
    where the kernels compute in float32 whatever the storage, else in `dtype`. cfg: the
    model_config() already read, if the caller has it. quantize: round a float checkpoint's
    linears to nearest with this spec as they load."""
    cfg = cfg or read_config(model_dir)
    family = family_for(cfg)
    args = family.model_args(cfg)
    if has_runtime(model_dir):          # a workspace: the weights as the kernels run them
        return prepacked_model(model_dir, args, device, max_positions, dtype, head_bits)
    raw = read_checkpoint(checkpoint_files(model_dir), progress)
    quantized = {}
    if cfg.get("quantization_config"):
        raw, quantized = split_quantized(raw, cfg["quantization_config"])
    elif quantize is not None:
        raw, quantized = rounded_at_load(raw, cfg, family, quantize, progress)
    weights = family.convert_weights(raw, args)
    model = skeleton(args, device, max_positions)
    compute = torch.float32 if device == "cpu" else dtype
    weights = {k: v.to(compute if "norm" in k else dtype) for k, v in weights.items()}
    codes = fused_quantized(family, quantized, args)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or set(missing) != {f"{name}.weight" for name in codes}:
            raise RuntimeError(f"missing {sorted(set(missing) - {f'{n}.weight' for n in codes})[:5]}, "
                               f"unexpected {unexpected[:5]}")
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint in {model_dir} does not match its config: {e}") from None
    for name, qw in codes.items():
        expected = tuple(model.get_submodule(name).weight.shape)
        if tuple(qw.q.shape) != expected:
            raise ModelLoadError(f"checkpoint in {model_dir} does not match its config: {name} holds "
                                 f"{tuple(qw.q.shape)} codes, the config makes it {expected}")
        if name == "embed":         # a GGUF's quantized token_embd: rows read from its codes
            model.embed = QuantizedEmbedding(QuantLinear(qw, None))
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(qw, model.get_submodule(name).bias))
    model = model.to(device).eval()
    model.finalize(compute, head_bits)
    return model


def skeleton(args: ModelArgs, device: str, max_positions: int) -> CausalLM:
    """The model on the meta device, with its ops (decided here, once) and rotary tables."""
    rope = RotaryEmbedding(args.rotary_dim, args.rope_theta, args.rope_scaling,
                           args.max_position_embeddings, max_positions)
    ops = ops_for(device, args.hidden_size, args.intermediate_size, args.head_dim, args.num_heads, args.num_kv_heads,
                  args.rotary_dim, args.attn_softcap)
    rope_local = local_rope(args, max_positions)
    with torch.device("meta"):
        return CausalLM(args, rope, ops, rope_local)


def prepacked_model(model_dir: Path, args: ModelArgs, device: str, max_positions: int, dtype: torch.dtype,
                    head_bits: int) -> CausalLM:
    """A workspace's runtime.pt, memory-mapped (models/workspace.py)."""
    model = skeleton(args, device, max_positions)
    notice = load_runtime(model, model_dir, torch.float32 if device == "cpu" else dtype, head_bits)
    if notice:
        print(f"quantserve: {notice}", file=sys.stderr)
    return model.eval()


def rounded_at_load(raw: dict[str, torch.Tensor], cfg: dict, family: Family, spec: QuantSpec, progress: bool
                    ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """(float tensors left, HF-named linears rounded to nearest): every linear the family's
    quantization recipe names, as `lite rtn` would write them."""
    from quantserve.quant.arch import quantized_linears
    from quantserve.quant.primitives import quantize

    names = quantized_linears(family.quant, cfg, raw)
    quantized = {name: quantize(raw.pop(f"{name}.weight").float(), spec)
                 for name in tqdm(names, desc=f"quantizing to {spec.bits} bits", unit="linear", file=sys.stderr,
                                  disable=not progress)}
    return raw, quantized


def local_rope(args: ModelArgs, max_positions: int) -> RotaryEmbedding | None:
    """The sliding-window layers' rotary table, where the family gives them a base of their own."""
    if not args.local_rope_theta:
        return None
    return RotaryEmbedding(args.rotary_dim, args.local_rope_theta, None, args.max_position_embeddings, max_positions)


def fused_quantized(family, quantized: dict[str, QuantizedWeight], args: ModelArgs) -> dict[str, QuantizedWeight]:
    """Unpacked HF-named linears -> internal names, fused like float weights: codes, scales and
    offsets all run along the output dimension, so the family's own fusion applies to each. Parts
    of mixed widths or groups (a GGUF's 4-bit q and requantized 8-bit v) fuse at the widest width
    and the finest group: a code keeps its value, a coarser group's scale and min repeat exactly."""
    if not quantized:
        return {}
    quantized = finest_groups(family, quantized, args)
    parts = {"q": lambda qw: qw.q, "scales": lambda qw: qw.scales, "mins": lambda qw: qw.offsets(),
             "bits": lambda qw: torch.full((qw.q.shape[0], 1), qw.spec.bits)}
    pieces = {part: family.convert_weights({f"{name}.weight": get(qw) for name, qw in quantized.items()}, args)
              for part, get in parts.items()}
    spec = next(iter(quantized.values())).spec

    def fused_spec(name: str) -> QuantSpec:
        width = pieces["q"][name].shape[1] // pieces["scales"][name].shape[1]
        group = spec.group_size if spec.width(pieces["q"][name].shape[1]) == width else width   # keeps -1
        return replace(spec, bits=int(pieces["bits"][name].max()), group_size=group)

    return {name.removesuffix(".weight"): QuantizedWeight(q, pieces["scales"][name], None, fused_spec(name),
                                                          pieces["mins"][name])
            for name, q in pieces["q"].items()}


def finest_groups(family, quantized: dict[str, QuantizedWeight], args: ModelArgs) -> dict[str, QuantizedWeight]:
    """Parts that the family fuses into one linear, brought to one group size (their finest)."""
    names = list(quantized)
    members = family.convert_weights({f"{n}.weight": torch.full((quantized[n].q.shape[0], 1), i)
                                      for i, n in enumerate(names)}, args)      # fused name -> source indices
    out = dict(quantized)
    for index in members.values():
        parts = [names[i] for i in index.unique().tolist()]
        finest = min(quantized[n].q.shape[1] // quantized[n].scales.shape[1] for n in parts)
        for n in parts:
            qw = quantized[n]
            repeat = qw.q.shape[1] // qw.scales.shape[1] // finest
            if repeat > 1:
                out[n] = QuantizedWeight(qw.q, qw.scales.repeat_interleave(repeat, 1), None,
                                         replace(qw.spec, group_size=finest), qw.offsets().repeat_interleave(repeat, 1))
    return out


def same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two model directories' tokenizers map the same tokens to the same ids (tokenizer.json's
    vocabulary and added tokens, else tokenizer.model's bytes); True when either has neither file."""
    digests = [_vocabulary_digest(d) for d in (a, b)]
    return None in digests or digests[0] == digests[1]


def _vocabulary_digest(model_dir: Path) -> str | None:
    if (model_dir / "tokenizer.json").is_file():
        spec = read_json(model_dir / "tokenizer.json")
        added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
        text = json.dumps([spec.get("model", {}).get("vocab"), added], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
    if (model_dir / "tokenizer.model").is_file():
        return hashlib.sha256((model_dir / "tokenizer.model").read_bytes()).hexdigest()
    return None


def torch_dtype(name: str, cfg: dict, device: str) -> torch.dtype:
    """EngineConfig.dtype -> weight storage dtype. auto, as in LMDeploy: bfloat16 for bfloat16
    checkpoints, float16 otherwise. (On CPU the kernels still compute in float32.)"""
    if name != "auto":
        return getattr(torch, name)
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    return torch.bfloat16 if stored == "bfloat16" else torch.float16


def require_supported(cfg: dict, model_format: str | None = None, quantization: str | None = None) -> None:
    """The architecture and quantization are known, and --model-format / --quantization (if
    given) say the truth about the checkpoint."""
    family_for(cfg)
    q = cfg.get("quantization_config")
    method = q.get("quant_method") if q else None
    if q and method not in ("awq", "gptq", "gguf", "smooth_quant"):
        raise ConfigError(f"quantized checkpoints ({method}) are not supported; awq, gptq, smooth_quant and "
                          "converted GGUF are")
    for flag, claim in (("model_format", model_format), ("quantization", quantization)):
        if claim in ("awq", "gptq", "gguf", "smooth_quant") and method != claim:
            how = "pass the .gguf file" if claim == "gguf" else \
                f"make one with `quantserve lite {claim if claim == 'smooth_quant' else 'auto_' + claim}`"
            raise ConfigError(f"the model is {method or 'not quantized (hf)'}, not {claim}; {how}", field=flag)
    if quantization == "w8a8" and method not in (None, "smooth_quant"):
        raise ConfigError(f"w8a8 quantizes a float model at load; this one is already {method}", field="quantization")


def load_time_spec(cfg: dict, quantization: str | None) -> QuantSpec | None:
    """--quantization w8a8 / w4a16 on a float checkpoint: the data-free round-to-nearest it gets
    at load (8-bit per output channel; 4-bit in the largest group of 128, 64, 32 that divides
    every linear's input); None when the weights load as they are."""
    if quantization not in ("w8a8", "w4a16") or cfg.get("quantization_config"):
        return None
    if quantization == "w8a8":
        return QuantSpec(8, -1)
    args = family_for(cfg).model_args(cfg)
    widths = (args.hidden_size, args.intermediate_size, args.num_heads * args.head_dim,
              args.expert_intermediate_size or args.intermediate_size)
    group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
    if group is None:
        raise ConfigError(f"w4a16 needs linears whose inputs divide by 32; this model has {widths}",
                          field="quantization")
    return QuantSpec(4, group)
