"""A model directory's deployment files, and the workspace `quantserve convert` writes.

The workspace keeps LMDeploy's TurboMind paths so that its tutorials' commands point at the
same places, with quantserve's content:

    workspace/
      triton_models/weights/     the model directory every command loads: config.json, the
                                 tokenizer and chat template, generation_config.json, config.ini
                                 (engine settings under LMDeploy's [llama] keys), the weights in
                                 the kernels' runtime layout (runtime.safetensors + layout.json),
                                 and kv_qparams.safetensors once `lite kv_qparams` wrote it
      triton_models/tokenizer/   the tokenizer files again, where LMDeploy keeps them

config.ini's quant_policy and session_len are the engine's defaults for the directory: a flag
given on the command line wins over them.
"""
from __future__ import annotations

import configparser
from pathlib import Path

import torch

WEIGHTS = Path("triton_models") / "weights"
TOKENIZER = Path("triton_models") / "tokenizer"
ENGINE_INI = "config.ini"
KV_QPARAMS = "kv_qparams.safetensors"
SIDE_FILES = (KV_QPARAMS,)         # safetensors beside the weights that are not checkpoint shards
SECTION = "llama"                  # LMDeploy's section name, whatever the architecture
SETTINGS = {"quant_policy": int, "session_len": int}


class WorkspaceError(ValueError):
    """A workspace or its files do not fit the model; the message says what to run."""


def model_dir_of(path: Path) -> Path:
    """A workspace root -> its weights directory; any other directory -> itself."""
    inner = path / WEIGHTS
    return inner if (inner / "config.json").is_file() else path


def saved_settings(model_dir: Path) -> dict:
    """config.ini's engine settings ({} without one)."""
    path = model_dir / ENGINE_INI
    if not path.is_file():
        return {}
    ini = configparser.ConfigParser()
    try:
        ini.read(path)
    except configparser.Error as e:
        raise WorkspaceError(f"{path}: not a readable config.ini ({e.message.splitlines()[0]})") from None
    section = ini[SECTION] if ini.has_section(SECTION) else {}
    out = {}
    for key, kind in SETTINGS.items():
        if key in section:
            try:
                out[key] = kind(section[key])
            except ValueError:
                raise WorkspaceError(f"{path}: {key} = {section[key]!r} is not a number") from None
    return out


def write_settings(model_dir: Path, values: dict) -> None:
    """Set keys of config.ini's [llama] section, keeping the rest of the file."""
    path = model_dir / ENGINE_INI
    ini = configparser.ConfigParser()
    if path.is_file():
        ini.read(path)
    if not ini.has_section(SECTION):
        ini.add_section(SECTION)
    for key, value in values.items():
        ini[SECTION][key] = str(value)
    with path.open("w") as f:
        ini.write(f)


def load_static_kv(model_dir: Path, bits: int, layers: int, kv_heads: int) -> dict[str, torch.Tensor] | None:
    """kv_qparams.safetensors at `bits` ([L, Hkv, groups] scale / zero for K and V), checked
    against the model; None when the cache is float or the directory has none."""
    from safetensors.torch import load_file

    path = model_dir / KV_QPARAMS
    if not bits or not path.is_file():
        return None
    saved = load_file(str(path))
    params = {name: saved[f"{name}.{bits}"] for name in ("k_scale", "k_zero", "v_scale", "v_zero")}
    if any(tuple(t.shape[:2]) != (layers, kv_heads) for t in params.values()):
        raise WorkspaceError(f"{path} holds parameters for {tuple(params['k_scale'].shape[:2])} layers x KV heads; "
                             f"the model has ({layers}, {kv_heads}): run `quantserve lite kv_qparams` for it")
    return params
