"""`quantserve convert MODEL_NAME MODEL_PATH`: a deployment workspace (models/workspace.py).

The model is loaded once as the engine runs it, on this machine's kernels: float weights packed
into panels, AWQ / GPTQ / GGUF codes into the integer kernels' panels, the output head quantized
as at run time. Those tensors are saved as they are, so a later load maps them from disk
instead of reading, converting and packing the checkpoint. MODEL_NAME picks the chat template
(LMDeploy's model names, text.MODEL_NAME_TEMPLATES); the model's own applies to other names.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from quantserve.config import ConfigError

# what a model directory holds beside its weights: configs, tokenizer, chat template
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def convert(model_name: str, model_path: str, dst_path: str = "./workspace", model_format: str | None = None,
            group_size: int | None = None, session_len: int | None = None, head_bits: int = 8,
            progress: bool = True) -> str:
    """Write the workspace; a summary of what it holds and how long loading each took."""
    from quantserve.models.loader import load_model, read_config, require_supported, torch_dtype
    from quantserve.models.resolve import resolve_model
    from quantserve.models.workspace import TOKENIZER, WEIGHTS, kernel_layout, save_runtime, write_settings
    from quantserve.quant.checkpoint import staged_dir

    src = resolve_model(model_path, progress=progress)
    cfg = read_config(src)
    require_supported(cfg, None if model_format in (None, "hf", "llama") else model_format)
    _check_group_size(cfg, group_size)
    dst = _replaceable(Path(dst_path))
    start = time.monotonic()
    model = load_model(src, torch_dtype("auto", cfg, "cpu"), "cpu", session_len or cfg.get("max_position_embeddings", 4096),
                       cfg, progress, head_bits)
    load_s = time.monotonic() - start
    with staged_dir(dst) as tmp:
        weights, tokenizer = tmp / WEIGHTS, tmp / TOKENIZER
        weights.mkdir(parents=True)
        tokenizer.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, weights / f.name)
                if "token" in f.name or f.suffix in (".model", ".jinja", ".txt"):
                    shutil.copy2(f, tokenizer / f.name)
        template = _set_template(weights, model_name)
        save_runtime(model, weights)
        write_settings(weights, _engine_ini(model_name, cfg, model, session_len))
    size = sum(f.stat().st_size for f in (dst / WEIGHTS).iterdir())
    return (f"converted {src} -> {dst} in {time.monotonic() - start:.1f} s (loading the source: {load_s:.1f} s)\n"
            f"workspace: {size / 1e6:,.1f} MB, packed for {kernel_layout(model.ops)}; chat template: {template}\n"
            f"run it: quantserve chat {dst}   |   quantserve serve api_server {dst}")


def _check_group_size(cfg: dict, group_size: int | None) -> None:
    """--group-size, when given for a quantized model, is the one it was quantized with."""
    q = cfg.get("quantization_config") or {}
    if group_size is not None and q and q.get("group_size") != group_size:
        raise ConfigError(f"the model is {q.get('quant_method')} with group size {q.get('group_size')}, not "
                          f"{group_size}", field="group_size")


def _replaceable(dst: Path) -> Path:
    """A directory convert may write: new, empty, or an earlier workspace (replaced whole)."""
    from quantserve.models.workspace import WEIGHTS

    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / WEIGHTS).is_dir())):
        raise ConfigError(f"{dst} exists and is not a workspace; remove it or choose another --dst-path",
                          field="dst_path")
    return dst


def _set_template(weights: Path, model_name: str) -> str:
    """The chat template MODEL_NAME stands for, written where the tokenizer finds it."""
    from quantserve.text import BUILTIN_TEMPLATES, template_for_model_name

    name = template_for_model_name(model_name)
    if name is None:
        print(f"quantserve convert: {model_name}: no built-in template by that name; the model's own chat template "
              "is kept", file=sys.stderr)
        return "the model's own"
    (weights / "chat_template.jinja").write_text(BUILTIN_TEMPLATES[name])
    config = weights / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        settings.pop("chat_template", None)          # the .jinja file is the one template
        config.write_text(json.dumps(settings, indent=2))
    return name


def _engine_ini(model_name: str, cfg: dict, model, session_len: int | None) -> dict:
    """config.ini's [llama] entries, under LMDeploy's keys; quant_policy and session_len are the
    engine's defaults for the workspace."""
    a = model.args
    q = cfg.get("quantization_config") or {}
    return {"model_name": model_name, "model_arch": (cfg.get("architectures") or ["?"])[0], "head_num": a.num_heads,
            "kv_head_num": a.num_kv_heads, "size_per_head": a.head_dim, "hidden_units": a.hidden_size,
            "inter_size": a.intermediate_size, "num_layer": a.num_layers, "vocab_size": a.vocab_size,
            "norm_eps": a.rms_norm_eps, "rope_theta": a.rope_theta, "max_position_embeddings": a.max_position_embeddings,
            "weight_type": f"int{q['bits']}" if q else str(cfg.get("torch_dtype") or "float16"),
            "group_size": q.get("group_size", 0), "quant_policy": 0,
            "session_len": session_len or a.max_position_embeddings}
