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
import json
from pathlib import Path

import torch

from quantserve.kernels import PANEL, QBLOCK, QPANEL, unpack_quantized, unpack_weight
from quantserve.models.layers import PanelEmbedding, QuantizedEmbedding
from quantserve.quant.linear import IntPanelLinear, Linear, PanelLinear, QuantLinear, unpack_nibbles
from quantserve.quant.primitives import QuantizedWeight, QuantSpec

WEIGHTS = Path("triton_models") / "weights"
TOKENIZER = Path("triton_models") / "tokenizer"
ENGINE_INI = "config.ini"
KV_QPARAMS = "kv_qparams.safetensors"
CALIBRATION_FILES = ("calibration.json", "inputs_stats.safetensors", "key_stats.safetensors",
                     "value_stats.safetensors")          # `lite calibrate`'s work dir (quant/statistics.py)
SIDE_FILES = (KV_QPARAMS, *CALIBRATION_FILES)   # files beside the weights that are not checkpoint shards
SECTION = "llama"                  # LMDeploy's section name, whatever the architecture
SETTINGS = {"quant_policy": int, "session_len": int}
VALID = {"quant_policy": (lambda v: v in (0, 4, 8), "0, 4 or 8"), "session_len": (lambda v: v > 0, "> 0")}


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
            valid, allowed = VALID[key]
            if not valid(out[key]):
                raise WorkspaceError(f"{path}: {key} = {out[key]} (allowed: {allowed})")
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = model_dir / KV_QPARAMS
    if not bits or not path.is_file():
        return None
    try:
        saved = load_file(str(path))
        params = {name: saved[f"{name}.{bits}"] for name in ("k_scale", "k_zero", "v_scale", "v_zero")}
    except (SafetensorError, KeyError) as e:
        raise WorkspaceError(f"{path}: not kv_qparams' parameters ({e}); run `quantserve lite kv_qparams` "
                             "again") from None
    if any(tuple(t.shape[:2]) != (layers, kv_heads) for t in params.values()):
        raise WorkspaceError(f"{path} holds parameters for {tuple(params['k_scale'].shape[:2])} layers x KV heads; "
                             f"the model has ({layers}, {kv_heads}): run `quantserve lite kv_qparams` for it")
    return params


# -- the weights in the kernels' runtime layout ------------------------------------------------
RUNTIME = "runtime.pt"             # torch.save of the finalized model's tensors: torch.load(mmap=True) maps it
LAYOUT = "layout.json"             # what each runtime module is, and the kernel layout it was packed for
LAYOUT_FORMAT = 1


def kernel_layout(ops) -> dict:
    """What the packed tensors depend on: native panels (bfloat16 as k-pairs where the CPU has
    vdpbf16ps) or none (the PyTorch ops run plain weights)."""
    native = hasattr(ops, "pack_int")
    return {"format": LAYOUT_FORMAT, "panels": native, "bf16_pairs": bool(getattr(ops, "bf16_dot", False)),
            "panel_rows": PANEL, "int_panel_rows": QPANEL, "int_block": QBLOCK}


def save_runtime(model, directory: Path) -> None:
    """The finalized model's tensors as they run (runtime.pt) and what each module is (layout.json)."""
    modules, embed = {}, _embed_kind(model)
    for name, m in model.named_modules():          # a tied head once, under the name it runs as
        name = "lm_head" if embed == "head_codes" and name == "embed.table" else name
        if isinstance(m, PanelLinear):
            modules[name] = {"kind": "panel", "wtype": m.wtype, "in": m.in_features, "out": m.out_features}
        elif isinstance(m, IntPanelLinear):
            modules[name] = {"kind": "int", "in": m.in_features, "out": m.out_features, "bits": m.spec.bits,
                             "group_size": m.spec.group_size, "symmetric": m.spec.symmetric}
        elif isinstance(m, Linear):          # the PyTorch ops' kinds (or a layer the native kernels do not take)
            modules[name] = {"kind": "linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, QuantLinear):
            modules[name] = {"kind": "quant", "in": m.in_features, "out": m.out_features, "bits": m.spec.bits,
                             "group_size": m.spec.group_size, "symmetric": m.spec.symmetric}
    layout = {"kernel_layout": kernel_layout(model.ops), "modules": modules, "embed": embed,
              "compute_dtype": str(model.compute_dtype).removeprefix("torch.")}
    torch.save(model.state_dict(), directory / RUNTIME)
    (directory / LAYOUT).write_text(json.dumps(layout, indent=1) + "\n")


def _embed_kind(model) -> str:

    if isinstance(model.embed, PanelEmbedding):
        return "head_panels"             # a tied head's float panels
    if isinstance(model.embed, QuantizedEmbedding):
        return "head_codes" if model.embed.table is model.lm_head else "own_codes"
    return "table"


def has_runtime(directory: Path) -> bool:
    return (directory / RUNTIME).is_file() and (directory / LAYOUT).is_file()


def load_runtime(model, directory: Path, compute: torch.dtype, head_bits: int) -> str | None:
    """Fill a model built on the meta device from runtime.pt: the panels memory-mapped as they
    are when the kernel layout matches, else unpacked and packed again for these ops (the
    notice returned says so)."""

    try:
        layout = json.loads((directory / LAYOUT).read_text())
    except json.JSONDecodeError as e:
        raise WorkspaceError(f"{directory / LAYOUT}: not valid JSON ({e}); run `quantserve convert` again") from None
    if layout.get("kernel_layout", {}).get("format") != LAYOUT_FORMAT:
        raise WorkspaceError(f"{directory / LAYOUT}: written by another quantserve version; run `quantserve convert` "
                             "again")
    try:
        state = torch.load(directory / RUNTIME, mmap=True, weights_only=True)
    except (RuntimeError, OSError, EOFError) as e:      # a truncated or foreign file
        raise WorkspaceError(f"{directory / RUNTIME}: cannot be read ({str(e).split('. ')[0]}); run "
                             "`quantserve convert` again") from None
    same = layout["kernel_layout"] == kernel_layout(model.ops)
    if layout["embed"] == "own_codes":          # a GGUF's quantized token table: placed below as embed.table
        model.embed = QuantizedEmbedding(torch.nn.Identity())
    for name, entry in layout["modules"].items():
        _place(model, name, (_prepacked if same else _holder)(model.ops, entry, name, state))
    _tie_embed(model, layout["embed"], same, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    placed = {*layout["modules"], "embed.table", *(["embed"] if layout["embed"] == "head_panels" else [])}
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in placed]
    if missing or unexpected:
        raise WorkspaceError(f"{directory / RUNTIME} does not fit layout.json (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); run `quantserve convert` again")
    if same:
        model.compute_dtype = compute
        model.fused = model.ops.fused_decoder(model)
        return None
    model.finalize(compute, head_bits)
    return (f"{directory} was packed for {layout['kernel_layout']}; this machine runs "
            f"{kernel_layout(model.ops)}: repacked at load")


def _place(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _spec(entry: dict) -> QuantSpec:
    return QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"])


def _prepacked(ops, entry: dict, name: str, state: dict):
    """The runtime module as saved."""
    if entry["kind"] == "panel":
        return PanelLinear.prepacked(ops, state.pop(f"{name}.packed"), entry["wtype"], entry["in"], entry["out"],
                                     state.pop(f"{name}.bias", None))
    if entry["kind"] == "int":
        panels = tuple(state.pop(f"{name}.{part}") for part in ("qcodes", "qscales", "qmins"))
        return IntPanelLinear.prepacked(ops, panels, _spec(entry), entry["in"], entry["out"],
                                        state.pop(f"{name}.bias", None))
    return _holder(ops, entry, name, state)


def _holder(ops, entry: dict, name: str, state: dict):
    """The loading-time module a runtime one came from (unpacked), for finalize() to pack anew."""
    bias = state.pop(f"{name}.bias", None)
    if entry["kind"] in ("panel", "linear"):
        weight = state.pop(f"{name}.weight") if entry["kind"] == "linear" else \
            unpack_weight(state.pop(f"{name}.packed"), entry["out"])
        with torch.device("meta"):             # no [N, K] allocation before the weight is assigned
            linear = Linear(entry["in"], entry["out"], bias=bias is not None)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias, requires_grad=False)
        return linear
    if entry["kind"] == "quant":
        codes, scales, mins = (state.pop(f"{name}.{part}") for part in ("codes", "scales", "mins"))
        codes = unpack_nibbles(codes) if entry["bits"] == 4 else codes
    else:
        panels = tuple(state.pop(f"{name}.{part}") for part in ("qcodes", "qscales", "qmins"))
        codes, scales, mins = unpack_quantized(*panels, entry["bits"], entry["out"])
    return QuantLinear(QuantizedWeight(codes, scales, None, _spec(entry), mins), bias)


def _tie_embed(model, kind: str, same: bool, state: dict) -> None:
    """An input embedding read from the head, as convert found it; its table's tensors are the head's."""
    for key in [k for k in state if k.startswith("embed.table.")] if kind == "head_codes" else ():
        del state[key]
    if kind == "head_codes":
        model.embed = QuantizedEmbedding(model.lm_head)
    elif kind == "head_panels" and same:
        model.embed = PanelEmbedding(model.lm_head)
    elif kind == "head_panels":         # the tied table again, for finalize() to tie and pack for these ops
        model.embed.weight = torch.nn.Parameter(model.lm_head.weight, requires_grad=False)
        model.lm_head = None
