"""GGUF file -> a model directory quantserve loads at the file's own bits.

read metadata -> config.json -> each tensor in the integer kernels' form (models/gguf_blocks.py:
codes with a float16 scale and min per 32 weights; float tensors stay float; llama.cpp's q/k row
permutation undone) -> model.safetensors -> tokenizer + chat template -> generation_config.json,
all written into a hidden sibling directory that is renamed into place only once complete. A file
without quantized tensors gives a plain float Hugging Face directory.
"""
import json
import re
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from quantserve.models.families import gguf_archs, registry
from quantserve.models.gguf_blocks import EXACT_BITS, GROUP, Codes, target_bits, to_codes
from quantserve.models.loader import ModelLoadError, one_line
from quantserve.quant.checkpoint import staged_dir

FORMAT = 2          # of the converted directory: 1 held float32 weights, 2 the file's own bits
STAMP = "gguf-format.json"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",       # qwen3: per-head RMSNorm of q and k
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",               # a mixture of experts' router
}
# a mixture's experts, stacked in one tensor [E, out, in] per projection
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_MLP_NAMES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")     # read into the config (Phi-3)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED = object()
_REQUIRED_PER_LAYER = [hf for part, hf in _LAYER_NAMES.items() if not part.endswith(("q_norm", "k_norm", "gate_inp"))]
# what gguf's reader and numpy raise on a corrupt file: bad values, wrong types, short or misshapen arrays
_CORRUPT = (ValueError, TypeError, IndexError, KeyError, OverflowError, ZeroDivisionError)
# config.json sizes that must be positive for the model to be built at all
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "max_position_embeddings", "vocab_size")


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True, replace: bool = False,
                 own_bits: bool = True) -> Path:
    """own_bits=False: every tensor dequantized to float16 instead (a plain Hugging Face directory)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not replace:
        raise FileExistsError(f"{out_dir} already exists; remove it or pick another output directory")
    reader, arch, config = gguf_metadata(gguf_path)
    log_line(progress, f"reading {gguf_path.name} ({arch}, {config['num_hidden_layers']} layers) -> {out_dir}")
    tensors, codes = gguf_tensors(reader, gguf_path, config, arch, progress, own_bits)
    if codes:
        config["quantization_config"] = quantization_summary(codes, gguf_path)
        log_line(progress, describe_summary(config["quantization_config"]))
    config["torch_dtype"] = _storage_dtype(tensors)
    try:
        with staged_dir(out_dir) as tmp:
            _save_weights(tensors, tmp / "model.safetensors")
            _write_json(tmp / "config.json", config)
            log_line(progress, "building tokenizer from GGUF metadata")
            with _corrupt_is_load_error(gguf_path):
                _write_tokenizer(reader, gguf_path, tmp)
            _write_json(tmp / STAMP, {"format": FORMAT, "source": gguf_path.name})
    except OSError as e:
        raise RuntimeError(f"cannot write the converted model to {out_dir}: {e.strerror or e}") from None
    return out_dir


def is_current(out_dir: Path) -> bool:
    """A directory converted by this version's format (older ones are converted again)."""
    try:
        return json.loads((Path(out_dir) / STAMP).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def gguf_metadata(path: Path) -> tuple[object, str, dict]:
    """(reader, architecture, config.json contents); ModelLoadError naming the file when it is not a
    GGUF of a supported model."""
    reader = open_gguf(path)
    with _corrupt_is_load_error(path):
        arch = _architecture(reader, path)
        return reader, arch, hf_config(reader, arch, path)


def gguf_tensors(reader, path: Path, config: dict, arch: str, progress: bool = False, own_bits: bool = True
                 ) -> tuple[dict, list[Codes]]:
    """(tensors under HF names: float ones as `.weight`, quantized linears as `.codes` (4-bit: two
    to a byte) `.scales` `.mins`; every Codes made), checked against the config."""
    import torch
    from tqdm import tqdm

    tensors, made, family = {}, [], gguf_archs()[arch]
    with _corrupt_is_load_error(path):
        for tensor in tqdm(reader.tensors, desc="reading GGUF blocks", unit="tensor", file=sys.stderr,
                           disable=not progress):
            if tensor.name in ROPE_FACTORS:         # LongRoPE's factors: config.json holds them
                continue
            for hf_name, value in _convert_tensor(tensor, path, config, family, own_bits):
                if isinstance(value, Codes):
                    tensors.update(codes_tensors(hf_name.removesuffix(".weight"), value))
                    made.append(value)
                else:
                    tensors[hf_name] = value
    if config.get("attention_bias"):        # HF Llama's attention_bias covers o too: a file without it means 0
        for i in range(config["num_hidden_layers"]):
            tensors.setdefault(f"model.layers.{i}.self_attn.o_proj.bias", torch.zeros(config["hidden_size"]))
    _check_complete(tensors, config, family, path)
    rename = registry()[config["model_type"]].gguf_rename
    return (rename(tensors) if rename else tensors), made


def codes_tensors(base: str, c: Codes) -> dict:
    import torch

    from quantserve.quant.linear import pack_nibbles

    codes = torch.from_numpy(np.ascontiguousarray(c.codes))                       # [N, K]
    return {f"{base}.codes": codes if c.bits == 8 else pack_nibbles(codes),       # 4-bit: [N, K/2]
            f"{base}.scales": torch.from_numpy(np.ascontiguousarray(c.scales)),
            f"{base}.mins": torch.from_numpy(np.ascontiguousarray(c.mins))}


def quantization_summary(made: list[Codes], path: Path) -> dict:
    """config.json's quantization_config for a converted GGUF: what each GGML type became."""
    types: dict[str, dict] = {}
    for c in made:
        if not np.isfinite(c.error):       # a NaN or inf weight in the file: never run it silently
            raise ModelLoadError(f"{path}: a {c.source} tensor holds weights that are not finite numbers")
        entry = types.setdefault(c.source, {"tensors": 0, "bits": c.bits, "max_rel_rms_error": 0.0})
        entry["tensors"] += 1
        entry["max_rel_rms_error"] = max(entry["max_rel_rms_error"], round(c.error, 6))
    return {"quant_method": "gguf", "bits": max(c.bits for c in made), "group_size": GROUP, "gguf_types": types}


def describe_summary(q: dict) -> str:
    def how(name: str, t: dict) -> str:
        if name == "Q4_K":
            return f"scales rounded to float16, {100 * t['max_rel_rms_error']:.3f}% rms"
        if name in EXACT_BITS:
            return "exact"
        return f"requantized, +{100 * t['max_rel_rms_error']:.2f}% rms error"

    parts = [f"{t['tensors']} {name} -> {t['bits']}-bit ({how(name, t)})" for name, t in sorted(q["gguf_types"].items())]
    return "weights at the file's own bits: " + ", ".join(parts)


def _storage_dtype(tensors: dict) -> str:
    """config.json's torch_dtype: that of the float matrices (float16 when every one is quantized)."""
    import torch

    kinds = {t.dtype for t in tensors.values() if t.dim() == 2 and t.is_floating_point()}
    if len(kinds) != 1:
        return "float16"
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(kinds.pop(), "float16")


@contextmanager
def _corrupt_is_load_error(path: Path):
    """Metadata of the wrong type, or tensors whose sizes disagree with it, fail deep inside gguf
    and numpy; report them as the corrupt file they are (and keep numpy's overflow warnings quiet)."""
    try:
        with np.errstate(all="ignore"):
            yield
    except ModelLoadError:
        raise
    except _CORRUPT as e:
        raise ModelLoadError(f"{path} is a corrupt GGUF file ({type(e).__name__}: {one_line(e)})") from None


def open_gguf(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with np.errstate(all="ignore"):  # a corrupt offset overflows quietly, then fails the read
            return _strict_reader()(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    except _CORRUPT as e:  # the reader fails deep inside numpy on truncated or foreign files
        reason = f"{type(e).__name__}: {one_line(e)}"
        raise ModelLoadError(f"{path} is not a readable GGUF file, truncated or corrupt? ({reason})") from None


@lru_cache(maxsize=1)
def _strict_reader():
    """gguf's reader, failing at the first read past the end of the file. The stock one reads short
    there, and a corrupt array length then loops (and allocates) far beyond the file's size."""
    import gguf

    class StrictReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            values = super()._get(offset, dtype, count, override_order)
            if len(values) != int(count):
                raise ValueError(f"{int(count)} values at byte {offset} run past the end of the file")
            return values

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY:
                item_type, length = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
                if length * _min_item_bytes(item_type) > len(self.data) - orig_offs - 12:
                    raise ValueError(f"an array of {length} items at byte {orig_offs} is longer than the file")
            return super()._get_field_parts(orig_offs, raw_type)

    return StrictReader


def _min_item_bytes(item_type: int) -> int:
    import gguf

    if item_type == gguf.GGUFValueType.STRING:
        return 8   # its length, even when empty
    if item_type == gguf.GGUFValueType.ARRAY:
        return 12  # its item type and length
    scalar = gguf.GGUFReader.gguf_scalar_to_np.get(item_type)
    return np.dtype(scalar).itemsize if scalar is not None else 1


def _architecture(reader, path: Path) -> str:
    arch, archs = _field(reader, "general.architecture"), gguf_archs()
    if arch not in archs:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(archs))}"
        )
    return arch


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def hf_config(reader, arch: str, path: Path) -> dict:
    """config.json contents from GGUF metadata (keys as in hub checkpoints)."""
    def meta(key, default=_REQUIRED):
        value = _field(reader, f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    names, family = {t.name for t in reader.tensors}, gguf_archs()[arch]
    config = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", None) or meta("expert_feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta("context_length")),
        "rope_theta": float32_value(meta("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, path),
        "rms_norm_eps": float32_value(meta("attention.layer_norm_rms_epsilon")),
        "vocab_size": _vocab_size(reader, meta, path),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    experts = _expert_count(reader, meta, path)
    if experts:             # a mixture of experts in every layer, top-k renormalised
        config.update(num_experts=experts, num_experts_per_tok=int(meta("expert_used_count")),
                      moe_intermediate_size=int(meta("expert_feed_forward_length", config["intermediate_size"])),
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if family.config:       # what llama.cpp fixes for this architecture, or keeps elsewhere in the file
        config.update(family.config(meta, reader, config))
    bad = [key for key in _SIZES if config[key] < 1]
    if bad:
        raise ModelLoadError(f"{path}: GGUF metadata gives {bad[0]} = {config[bad[0]]}, not a positive size")
    return config


def _expert_count(reader, meta, path: Path) -> int:
    """expert_count, checked against the first stacked expert tensor, with 1 <= expert_used_count <= it."""
    experts = int(meta("expert_count", 0))
    if not experts:
        return 0
    stacks = [t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight"]
    outer = int(stacks[0].shape[-1]) if stacks else None          # GGUF lists dims innermost-first
    used = int(meta("expert_used_count", 0))
    if outer != experts or not 1 <= used <= experts:
        raise ModelLoadError(f"{path}: expert_count {experts} and expert_used_count {used} do not match the "
                             f"file's expert tensors ({outer} experts)")
    return experts


def float32_value(value) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06; keep the short spelling
    return float(str(np.float32(value)))


def _rope_scaling(meta, path: Path) -> dict | None:
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float32_value(meta("rope.scaling.factor"))}
    raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (only linear)")


def _vocab_size(reader, meta, path: Path) -> int:
    size = meta("vocab_size", None)
    if size is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{path}: GGUF has neither a vocab_size nor a token list")
        size = len(tokens.data)
    return int(size)


def hf_tensor_name(name: str, layer_names: dict | None = None) -> str | None:
    """layer_names: an architecture's own layer tensors beside the shared ones (GgufArch.layer_names)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    names = {**_LAYER_NAMES, **(layer_names or {})}
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf permute: its interleaved-pair rope layout back to
    HF's rotate_half layout (first half / second half of each head)."""
    # llama.cpp: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); undone by the reverse reshape
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor, path: Path) -> np.ndarray:
    """Float32 array in torch layout [out, in] (GGUF lists dims innermost-first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be dequantized"
        ) from e
    expected = tuple(int(d) for d in reversed(tensor.shape))
    if values.shape != expected:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} dequantized to {values.shape}, expected {expected}")
    return np.array(values, dtype=np.float32)  # copy: the reader's arrays are read-only memmaps


def _convert_tensor(tensor, path: Path, config: dict, family, own_bits: bool) -> list[tuple]:
    """[(HF name, a float torch tensor or Codes in torch layout [out, in])]: one pair, or one per
    expert for a mixture's stacked experts."""
    import torch

    names = _hf_names(tensor.name, config, family.layer_names)
    if names is None:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has no Hugging Face counterpart (not supported)")
    heads = _permuted_heads(tensor.name, config) if family.permuted_qk else None
    kind = tensor.tensor_type.name
    shape = tuple(int(d) for d in reversed(tensor.shape))
    rows = (int(np.prod(shape[:-1])), shape[-1])                  # experts' rows one after another
    if len(names) > 1 and (len(shape) != 3 or shape[0] != len(names)):
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} of shape {shape} does not hold {len(names)} experts")
    if target_bits(kind) is None or len(shape) == 1 or not own_bits:
        values = dequantize_tensor(tensor, path)
        values = unpermute_qk(values, heads) if heads else values
        if family.norm_shift and tensor.name.endswith("norm.weight"):
            values = values - family.norm_shift     # llama.cpp stores Gemma's (1 + w); transformers' checkpoints w
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(kind, torch.float16)
        values = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
        return list(zip(names, values if len(names) > 1 else [values]))
    try:
        c = to_codes(tensor.data, kind, rows)
    except NotImplementedError as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has type {kind}, which cannot be read") from e
    if heads:       # rows are independent: codes, scales and mins permute alike
        c.codes, c.scales, c.mins = (unpermute_qk(a, heads) for a in (c.codes, c.scales, c.mins))
    return list(zip(names, c.split(len(names))))


def _hf_names(gguf_name: str, config: dict, layer_names: dict) -> list[str] | None:
    """The HF names a GGUF tensor holds: one, or one per expert ([E, out, in] stacks)."""
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _EXPERT_NAMES or not config.get("num_experts"):
        name = hf_tensor_name(gguf_name, layer_names)
        return None if name is None else [name]
    layer, part, kind = match.groups()
    return [f"model.layers.{layer}.mlp.experts.{e}.{_EXPERT_NAMES[part]}.{kind}" for e in range(config["num_experts"])]


def _permuted_heads(name: str, config: dict) -> int | None:
    if ".attn_q." in name:
        return config["num_attention_heads"]
    if ".attn_k." in name:
        return config["num_key_value_heads"]
    return None


def _save_weights(tensors: dict, out_file: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(out_file), metadata={"format": "pt"})
    out_file.chmod(0o644)  # safetensors creates files owner-only


def _check_complete(tensors: dict, config: dict, family, path: Path) -> None:
    if config["num_hidden_layers"] > len(tensors):  # a corrupt block_count: do not list 2**40 layers' names
        raise ModelLoadError(f"{path}: block_count {config['num_hidden_layers']} exceeds the {len(tensors)} tensors")
    per_layer = [n if n not in _MLP_NAMES or not config.get("num_experts") else n.replace("mlp.", "mlp.experts.0.")
                 for n in _REQUIRED_PER_LAYER] + (["mlp.gate"] if config.get("num_experts") else [])
    per_layer = list(family.required) or per_layer
    required = ["model.embed_tokens", "model.norm"] + [
        f"model.layers.{i}.{name}" for i in range(config["num_hidden_layers"]) for name in per_layer
    ]
    missing = [name for name in required if f"{name}.weight" not in tensors and f"{name}.codes" not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: GGUF lacks {len(missing)} tensors, e.g. {missing[:3]}")
    embed = tensors.get("model.embed_tokens.weight", tensors.get("model.embed_tokens.codes"))
    if embed.shape[0] != config["vocab_size"]:
        raise ModelLoadError(f"{path}: token_embd has {embed.shape[0]} rows but vocab_size is {config['vocab_size']}")


def _write_tokenizer(reader, path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except ValueError as e:          # transformers reads no GGUF of this architecture (smollm3, internlm2)
            if "is not supported" not in str(e):
                raise
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=_tokenizer_only(reader, Path(tmp)).name)
    except Exception as e:  # transformers' own GGUF parsing fails in many types
        reason = f"{type(e).__name__}: {one_line(e)}"
        raise ModelLoadError(f"{path}: cannot build a tokenizer from its metadata ({reason})") from None
    template = _field(reader, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    generation = {
        key: _field(reader, f"tokenizer.ggml.{key}")
        for key in ("bos_token_id", "eos_token_id", "padding_token_id")
    }
    generation["pad_token_id"] = generation.pop("padding_token_id")
    _write_json(out_dir / "generation_config.json", {k: v for k, v in generation.items() if v is not None})


def _tokenizer_only(reader, tmp: Path) -> Path:
    """The file's tokenizer.* metadata alone, under the `llama` architecture transformers reads."""
    import gguf

    out = tmp / "tokenizer.gguf"
    writer = gguf.GGUFWriter(str(out), "llama")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if array else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def log_line(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[quantserve] {message}", file=sys.stderr, flush=True)
