"""LoRA adapters (PEFT's directories) served over any base, float or quantized, several per batch.

Reading: adapter_config.json + adapter_model.safetensors -> each targeted HF linear's pair
(lora_A [r, K], lora_B [N_p, r]) -> the engine linear it feeds (the family's recipe names it:
q_proj -> attn.qkv, ...) and its rows there. The family's own `convert_weights` places B's rows,
as it fuses checkpoint weights: q/k/v into qkv, gate/up into gate_up, InternLM2's interleaved
wqkv. An engine linear's parts are stacked into one pair of linears, K -> R (every part's A)
and R -> N (each part's B, times its scale, in its rows, reading its own R columns), so the
delta is two small linears whatever the parts. They are runtime linears like the base's (native
float panels on CPU), so an adapter row's numbers do not depend on the batch around it either.

Serving: once an adapter is loaded, the decoder layers' four linears become `LoRALinear`s around
the runtime linear they held (whatever its kind), which add x @ A @ B for the rows of each
adapter the step's batch holds. The model runner gives the model every token's adapter slot per
step; a step with none keeps the fused decode kernel, which cannot add deltas.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantserve.models.families import Family
from quantserve.models.layers import CausalLM, ModelArgs
from quantserve.models.loader import ModelLoadError, read_json, read_weights_file
from quantserve.quant.linear import Linear, runtime_linear

ADAPTED = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")      # per layer, the linears an adapter may target
_PAIR = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_LAYER = re.compile(r"\blayers\.(\d+)\.")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class LoRAError(ValueError):
    """An adapter that cannot be served here, or no room for it; the message says why."""


@dataclass
class LoRAPair:
    """One engine linear's delta for one adapter: x [T, K] -> b(a(x)) [T, N]."""

    a: nn.Module          # K -> R runtime linear: the A of every adapted part, stacked
    b: nn.Module          # R -> N runtime linear: each part's B times its scale, in its rows

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for m in (self.a, self.b) for t in (*m.buffers(), *m.parameters()))


@dataclass(eq=False)
class Adapter:
    path: str
    pairs: dict[str, LoRAPair]           # engine linear (layers.3.attn.qkv) -> its delta
    id: int = 0                          # unique in the engine's life (prefix-cache keys), set when added
    slot: int = -1

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pairs.values())


def read_adapter(path: str | Path, model: CausalLM, family: Family, max_rank: int) -> Adapter:
    """A PEFT LoRA directory, checked and mapped onto `model`'s linears: runtime linears of its ops,
    in its compute dtype (the activations': float32 on CPU), on its device."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAError(f"{path} is not a directory (an adapter is a directory with adapter_config.json)")
    config = adapter_config(path, max_rank)
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    parts = lora_parts(read_tensors(path), max_rank)
    grouped: dict[str, dict[int, tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in parts.items():
        target, index = engine_target(module, model, family)
        grouped.setdefault(target, {})[index] = (module, a, b)
    pairs = {target: stack_parts(target, pieces, model, family, scale) for target, pieces in grouped.items()}
    return Adapter(str(path), pairs)


def adapter_config(path: Path, max_rank: int) -> dict:
    """adapter_config.json, refusing what the engine does not run (each refusal names the key)."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise LoRAError(f"no adapter_config.json in {path}")
    try:
        config = read_json(file)
    except ModelLoadError as e:
        raise LoRAError(str(e)) from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{file}: only LoRA adapters are served (peft_type {config.get('peft_type')!r})"
                        if isinstance(config, dict) else f"{file} is not a JSON object")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError(f"{file}: r must be a positive integer and lora_alpha a number (got r={r!r}, "
                        f"lora_alpha={alpha!r})")
    if r > max_rank:
        raise LoRAError(f"the adapter's rank r={r} is over --max-lora-rank {max_rank}")
    refused = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas", "use_dora": "DoRA",
               "modules_to_save": "fully trained modules", "lora_bias": "LoRA biases"}
    for key, what in refused.items():
        if config.get(key):
            raise LoRAError(f"{file}: {key} ({what}) is not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{file}: bias={config['bias']!r} (trained biases) is not supported; only bias='none'")
    # fan_in_fan_out concerns the base weight's layout (GPT-2's Conv1D); lora_A / lora_B keep theirs
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            try:
                return read_weights_file(path / name)
            except ModelLoadError as e:
                raise LoRAError(str(e)) from None
    raise LoRAError(f"no {' or '.join(_WEIGHT_FILES)} in {path}")


def lora_parts(tensors: dict[str, torch.Tensor], max_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT names -> {HF module: (A [r, K], B [N_p, r])} in float32; anything else is refused."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _PAIR.match(name)
        if m is None:
            module = re.sub(r"\.(lora_\w+|base_layer|modules_to_save)(\..*)?$", "",
                            name.removeprefix("base_model.model."))
            raise LoRAError(f"the adapter adapts {module} in a way quantserve does not serve ({name}): only LoRA "
                            "pairs (lora_A, lora_B) of the decoder layers' linears are supported")
        found.setdefault(m.group(1), {})[m.group(2)] = t.float()
    if not found:
        raise LoRAError("the adapter holds no LoRA weights")
    parts = {}
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"{module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a rank-r pair "
                            "([r, in] and [out, r])")
        if a.shape[0] > max_rank:
            raise LoRAError(f"{module}: rank {a.shape[0]} is over --max-lora-rank {max_rank}")
        parts[module] = (a, b)
    return parts


def engine_target(module: str, model: CausalLM, family: Family) -> tuple[str, int]:
    """An HF linear (model.layers.3.self_attn.q_proj) -> (the engine linear it feeds, which of that
    linear's fused parts it is, -1 for all of it), from the family's recipe and its own fusion."""
    arch, layer = family.quant, _LAYER.search(module)
    suffix = ".".join(module.split(".")[-2:])
    if "experts." in module:
        raise LoRAError(f"{module}: LoRA on mixture-of-experts expert linears is not supported")
    i = int(layer.group(1)) if layer else -1
    if suffix not in arch.inputs or i >= model.args.num_layers or module not in arch.layer_linears(i):
        raise LoRAError(f"the adapter targets {module}, which quantserve cannot adapt: only the decoder layers' "
                        "attention and MLP linears (not embeddings, lm_head or routers)")
    target = f"layers.{i}.{arch.inputs[suffix]}"
    if arch.inputs[suffix] not in ADAPTED or not _has(model, target):
        raise LoRAError(f"{module}: layer {i} has no dense {arch.inputs[suffix]} (a mixture-of-experts layer?)")
    siblings = [n for n in arch.layer_linears(i) if arch.inputs[".".join(n.split(".")[-2:])] == arch.inputs[suffix]]
    if len(siblings) == 1:
        return target, -1
    # the family's fusion of one marker row per part gives the parts' order in the fused linear
    markers = {f"{n}.weight": torch.full((1, 1), float(j)) for j, n in enumerate(siblings)}
    order = family.convert_weights(markers, model.args)[f"{target}.weight"].flatten().long().tolist()
    return target, order.index(siblings.index(module))


def _has(model: CausalLM, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def part_sizes(args: ModelArgs, linear: str) -> tuple[int, ...]:
    """Output rows of each part of a fused engine linear, in order (as layers.py builds them)."""
    if linear == "attn.qkv":
        return args.q_size, args.kv_size, args.kv_size
    if linear == "mlp.gate_up":
        return args.intermediate_size, args.intermediate_size
    return ()


def stack_parts(target: str, pieces: dict[int, tuple[str, torch.Tensor, torch.Tensor]], model: CausalLM,
                family: Family, scale: float) -> LoRAPair:
    """The adapted parts of one engine linear -> one pair of linears, shapes checked against the model."""
    linear = model.get_submodule(target)
    n, k = linear.out_features, linear.in_features
    sizes = part_sizes(model.args, target.split(".", 2)[2])
    rank = sum(a.shape[0] for _, a, _ in pieces.values())
    a_all, b_all, col = torch.zeros(rank, k), torch.zeros(n, rank), 0          # [R, K], [N, R]
    for index, (module, a, b) in sorted(pieces.items()):
        if index < 0:          # all of the linear: the family's conversion orders its rows (InternLM2's wqkv)
            rows, want = slice(0, n), n
            if b.shape[0] == n:
                b = family.convert_weights({f"{module}.weight": b}, model.args)[f"{target}.weight"]
        else:
            start = sum(sizes[:index])
            rows, want = slice(start, start + sizes[index]), sizes[index]
        if a.shape[1] != k or b.shape[0] != want:
            raise LoRAError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit this model's "
                            f"{target}: expected [r, {k}] and [{want}, r]")
        r = a.shape[0]
        a_all[col:col + r] = a
        b_all[rows, col:col + r] = b * scale
        col += r
    return LoRAPair(runtime_of(a_all, model), runtime_of(b_all, model))


def runtime_of(weight: torch.Tensor, model: CausalLM) -> nn.Module:
    """A float weight [N, K] as the runtime linear the model's ops run, in its compute dtype."""
    holder = Linear(weight.shape[1], weight.shape[0], bias=False)
    holder.weight.data = weight.to(model.norm.weight.device, model.compute_dtype)
    return runtime_linear(model.ops, holder)


class LoRALinear(nn.Module):
    """A runtime linear (any kind) plus the low-rank deltas of the adapters the step's rows use."""

    def __init__(self, base: nn.Module, name: str, loras: LoRASet):
        super().__init__()
        self.base, self.name, self.loras = base, name, loras
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> base(x) + each adapter's b(a(x[rows])) on its rows: [T, N]."""
        y = self.base(x)
        for adapter, rows in self.loras.groups:
            pair = adapter.pairs.get(self.name)
            if pair is None:
                continue
            if rows is None:                                                   # every row: no gather
                y.add_(pair.b(pair.a(x)))                                      # [T, R] -> [T, N]
            else:
                y.index_add_(0, rows, pair.b(pair.a(x[rows])))                 # [n, R] -> [n, N]
        return y


class LoRASet:
    """The adapters a model holds (at most max_loras, each in a slot) and, per step, which rows use
    which. An adapter removed while requests still use it keeps its slot until they have gone."""

    def __init__(self, model: CausalLM, family: Family, max_loras: int, max_rank: int):
        self.model, self.family, self.max_rank = model, family, max_rank
        self.slots: list[Adapter | None] = [None] * max_loras
        self.names: dict[str, Adapter] = {}
        self.by_id: dict[int, Adapter] = {}
        self.ids = itertools.count(1)
        self.groups: list[tuple[Adapter, torch.Tensor | None]] = []      # this step's: adapter, its rows (None: all)

    def read(self, path: str | Path) -> Adapter:
        """Read and check an adapter for this model (touches no serving state: any thread)."""
        return read_adapter(path, self.model, self.family, self.max_rank)

    def add(self, name: str, adapter: Adapter, in_use: set[int]) -> None:
        """Serve `adapter` as `name` in a free slot (one whose adapter was removed and that no request
        in `in_use`, the live requests' adapter ids, still reads)."""
        if name in self.names:
            raise LoRAError(f"an adapter named '{name}' is already loaded")
        named = {id(a) for a in self.names.values()}
        free = [s for s, a in enumerate(self.slots) if a is None or (id(a) not in named and a.id not in in_use)]
        if not free:
            raise LoRAError(f"{len(self.slots)} adapters are loaded, the most --max-loras allows: unload one first")
        old = self.slots[free[0]]
        if old is not None:
            del self.by_id[old.id]
        adapter.id, adapter.slot = next(self.ids), free[0]
        self.slots[adapter.slot] = self.names[name] = self.by_id[adapter.id] = adapter
        self.attach()

    def remove(self, name: str, in_use: set[int]) -> None:
        adapter = self.names.pop(name, None)
        if adapter is None:
            raise LoRAError(f"no adapter named '{name}' is loaded")
        if adapter.id not in in_use:              # else its requests finish with it; add() reuses the slot later
            self.slots[adapter.slot] = None
            del self.by_id[adapter.id]

    def id_of(self, name: str) -> int | None:
        adapter = self.names.get(name)
        return None if adapter is None else adapter.id

    def slot_of(self, adapter_id: int) -> int:
        return self.by_id[adapter_id].slot

    def attach(self) -> None:
        """Wrap the decoder layers' linears (once), so they add the deltas of the step's adapters."""
        if self.model.loras is self:
            return
        for i, layer in enumerate(self.model.layers):
            for name in ADAPTED:
                owner, _, child = name.rpartition(".")
                parent = getattr(layer, owner)
                if hasattr(parent, child):                  # a mixture-of-experts layer has no dense MLP
                    setattr(parent, child, LoRALinear(getattr(parent, child), f"layers.{i}.{name}", self))
        self.model.loras = self

    def select(self, slots: torch.Tensor | None) -> None:
        """This step's adapters from every token's slot ([T], -1: none); None: no adapter at all."""
        self.groups = []
        if slots is None:
            return
        for slot in slots.unique().tolist():
            if slot >= 0:
                rows = (slots == slot).nonzero().squeeze(1)                    # [n]
                self.groups.append((self.slots[slot], None if len(rows) == len(slots) else rows))
