"""`lite calibrate` and `lite kv_qparams`: activation statistics, and static KV cache parameters
made from them (LMDeploy's two-step KV int8 recipe).

calibrate runs the calibration windows through the float model and keeps, over every token:
- for K and V of every layer (as the cache stores them: after RoPE and any q/k norm), per KV
  head and channel: min, max and absmax, [Hkv, D]; for head sizes that are a power of two the
  same of the Hadamard-rotated vectors too (`rot_*`), which is what an int4 cache quantizes;
- for every linear's input (the engine's fused linears: attention qkv and o, MLP gate_up and
  down), per input channel: min, max, mean, absmax and absmean, [K].
Files in the work dir: key_stats.safetensors, value_stats.safetensors (`layers.{i}.{stat}`),
inputs_stats.safetensors (`{linear}.{stat}`) and calibration.json (what produced them).

kv_qparams reduces the K / V ranges over channels to one range per layer and head (and per half
of the head for int4 keys, which have two groups), and turns them into scale and zero for 8 and
4 bits (kvcache.quant.static_qparams), written as kv_qparams.safetensors into a model or
workspace directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantserve.kvcache.quant import groups_for, hadamard, rotates, static_qparams
from quantserve.models.workspace import CALIBRATION_FILES, KV_QPARAMS
from quantserve.quant.primitives import QuantError

ABOUT, INPUT_STATS, KEY_STATS, VALUE_STATS = CALIBRATION_FILES
STAT_FILES = {"k": KEY_STATS, "v": VALUE_STATS}


class ChannelStats:
    """Running per-channel min / max / sums of |x| and x over rows of x: [T, ..., C]."""

    def __init__(self):
        self.min = self.max = self.absmax = self.sum = self.abssum = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        parts = {"min": x.amin(0), "max": x.amax(0), "absmax": x.abs().amax(0), "sum": x.sum(0),
                 "abssum": x.abs().sum(0)}
        if self.rows == 0:
            self.__dict__.update(parts)
        else:
            self.min, self.max = torch.minimum(self.min, parts["min"]), torch.maximum(self.max, parts["max"])
            self.absmax = torch.maximum(self.absmax, parts["absmax"])
            self.sum, self.abssum = self.sum + parts["sum"], self.abssum + parts["abssum"]
        self.rows += x.shape[0]

    def ranges(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}min": self.min, f"{prefix}max": self.max, f"{prefix}absmax": self.absmax}

    def all(self) -> dict[str, torch.Tensor]:
        return {**self.ranges(), "mean": self.sum / self.rows, "absmean": self.abssum / self.rows}


class KVRecorder:
    """Wraps the model's ops.kv_write: every K and V written to the cache is counted first."""

    def __init__(self, ops, num_layers: int, head_dim: int):
        self.write, self.head_dim = ops.kv_write, head_dim
        self.plain = {w: [ChannelStats() for _ in range(num_layers)] for w in ("k", "v")}
        self.rotated = {w: [ChannelStats() for _ in range(num_layers)] for w in ("k", "v")}

    def __call__(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        for which, x in (("k", k), ("v", v)):                        # x: [T, Hkv, D]
            self.plain[which][layer].add(x)
            if rotates(4, self.head_dim):
                self.rotated[which][layer].add(x.float() @ hadamard(self.head_dim))
        self.write(cache, layer, k, v, slots)

    def tensors(self, which: str) -> dict[str, torch.Tensor]:
        out = {}
        for i, (plain, rotated) in enumerate(zip(self.plain[which], self.rotated[which])):
            out.update({f"layers.{i}.{k}": t for k, t in plain.ranges().items()})
            if rotated.rows:
                out.update({f"layers.{i}.{k}": t for k, t in rotated.ranges("rot_").items()})
        return out


def calibrate(model_dir: Path, windows: list[list[int]], batch_size: int, work_dir: Path, about: dict,
              progress: bool = True) -> str:
    """Run the windows through the float model, save the statistics; a one-line summary."""
    from safetensors.torch import save_file

    from quantserve.quant.calib import calibration_engine, projections, run_windows

    seqlen = len(windows[0])
    engine = calibration_engine(model_dir, seqlen, batch_size)
    ops = engine.model.layers[0].attn.ops
    recorder = KVRecorder(ops, engine.args.num_layers, engine.args.head_dim)
    inputs = {f"layers.{p}": ChannelStats() for p in projections(engine.model.layers)}
    ops.kv_write = recorder
    try:
        run_windows(engine, windows, batch_size, inputs, progress)
    finally:
        del ops.kv_write
    work_dir.mkdir(parents=True, exist_ok=True)
    for which, name in STAT_FILES.items():
        save_file(_contiguous(recorder.tensors(which)), str(work_dir / name))
    save_file(_contiguous({f"{n}.{k}": t for n, s in inputs.items() for k, t in s.all().items()}),
              str(work_dir / INPUT_STATS))
    about = {**about, "tokens": seqlen * len(windows), "layers": engine.args.num_layers,
             "kv_heads": engine.args.num_kv_heads, "head_dim": engine.args.head_dim}
    (work_dir / ABOUT).write_text(json.dumps(about, indent=2) + "\n")
    return (f"calibrated on {about['tokens']} tokens of {about['dataset']}: K/V ranges of {about['layers']} layers, "
            f"inputs of {len(inputs)} linears -> {work_dir}")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.contiguous() for k, t in tensors.items()}


def kv_qparams(work_dir: Path, target: Path, symmetric: bool) -> str:
    """Static K / V parameters for 8 and 4 bits from `calibrate`'s statistics -> target/kv_qparams.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    missing = [n for n in (*STAT_FILES.values(), ABOUT) if not (work_dir / n).is_file()]
    if missing:
        raise QuantError(f"--work-dir {work_dir}: no {missing[0]}; run `quantserve lite calibrate` into it first")
    try:
        about = json.loads((work_dir / ABOUT).read_text())
    except json.JSONDecodeError as e:
        raise QuantError(f"{work_dir / ABOUT}: not valid JSON ({e})") from None
    out = {}
    for which, name in STAT_FILES.items():
        try:
            stats = load_file(str(work_dir / name))
            for bits in (8, 4):
                scale, zero = zip(*(_layer_params(stats, i, which, bits, symmetric) for i in range(about["layers"])))
                out[f"{which}_scale.{bits}"], out[f"{which}_zero.{bits}"] = torch.stack(scale), torch.stack(zero)
        except (SafetensorError, KeyError) as e:       # a damaged file, or one of another model
            raise QuantError(f"{work_dir / name}: not `lite calibrate`'s statistics for this work dir ({e}); run "
                             "`quantserve lite calibrate` again") from None
    target.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(out), str(target / KV_QPARAMS), metadata={"symmetric": str(symmetric),
                                                                    "model": str(about.get("model"))})
    return (f"static KV parameters ({'symmetric' if symmetric else 'asymmetric'}, int8 and int4) for "
            f"{about['layers']} layers x {about['kv_heads']} heads -> {target / KV_QPARAMS}")


def _layer_params(stats: dict, layer: int, which: str, bits: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's [Hkv, groups] scale and zero: the channel ranges of each group reduced."""
    prefix = "rot_" if bits == 4 and f"layers.{layer}.rot_min" in stats else ""
    lo, hi = stats[f"layers.{layer}.{prefix}min"], stats[f"layers.{layer}.{prefix}max"]      # [Hkv, D]
    groups = groups_for(which, bits)
    lo, hi = (t.reshape(t.shape[0], groups, -1) for t in (lo, hi))
    return static_qparams(lo.amin(-1), hi.amax(-1), bits, symmetric)
