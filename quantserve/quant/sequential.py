"""Layer-by-layer calibration: each decoder layer is calibrated on the outputs of the layers
before it, already quantized, so it learns to correct the error that reaches it (GPTQ's order,
as AutoGPTQ and GPTQModel run it).

Every window's hidden state and residual ([T, H] per batch of windows) are kept between
layers. For each layer: pass 1 runs the float layer with statistics hooks on its four
projections; the caller quantizes the layer's linears from those statistics; their dequantized
weights replace the float ones; pass 2 runs the quantized layer to give the next layer its
inputs. The cost is two runs of every layer over the calibration set.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from quantserve.kvcache.paged import AttentionMetadata, PrefillChunk
from quantserve.quant.calib import HESSIAN_ROWS, InputStats, calibration_dtype, projections

# (layer index, that layer's statistics by engine projection name) -> HF name -> float weight
QuantizeLayer = Callable[[int, dict[str, InputStats]], dict[str, torch.Tensor]]


class LayerwiseRunner:
    def __init__(self, model_dir: Path, windows: list[list[int]], batch_size: int, keep: int = 2048):
        from quantserve.config import EngineConfig
        from quantserve.engine.engine import Engine
        from quantserve.models.loader import family_for, read_config

        seqlen = len(windows[0])
        engine = Engine(model_dir, EngineConfig(dtype=calibration_dtype(), session_len=seqlen + 1,
                                                max_batch_size=batch_size, cache_max_tokens=(seqlen + 64) * batch_size),
                        progress=False)
        self.model, self.cache, self.args = engine.model, engine.cache, engine.args
        self.family = family_for(read_config(Path(model_dir)))
        self.keep = keep
        self.hessian_share = min(1.0, HESSIAN_ROWS / (seqlen * len(windows)))
        self.batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        self.meta = {len(b): self._prefill_meta(len(b), seqlen) for b in self.batches}
        self.positions = torch.arange(seqlen)
        with torch.inference_mode():
            self.hidden = [self.model.embed_tokens(torch.tensor(b).flatten()).float() for b in self.batches]  # [T, H]
        self.residual: list[torch.Tensor | None] = [None] * len(self.batches)

    def _prefill_meta(self, count: int, seqlen: int) -> AttentionMetadata:
        """`count` windows side by side, each a whole prompt in its own blocks."""
        blocks = -(-seqlen // self.cache.block_size)
        chunks = [PrefillChunk(j * seqlen, seqlen, seqlen, torch.arange(j * blocks, (j + 1) * blocks))
                  for j in range(count)]
        slots = torch.cat([c.block_ids.repeat_interleave(self.cache.block_size)[:seqlen] * self.cache.block_size
                           + torch.arange(seqlen) % self.cache.block_size for c in chunks])
        return AttentionMetadata(slot_mapping=slots, num_decode=0, decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
                                 decode_context_lens=torch.zeros(0, dtype=torch.long),
                                 decode_mask=torch.zeros(0, 1, 1, 0, dtype=torch.bool), prefills=chunks)

    @torch.inference_mode()
    def run(self, quantize_layer: QuantizeLayer, progress: bool = True) -> None:
        steps = 2 * len(self.batches) * self.args.num_layers
        with tqdm(total=steps, desc="calibration (layer by layer)", unit="batch", disable=not progress,
                  file=sys.stderr) as bar:
            for i in range(self.args.num_layers):
                bar.set_postfix(layer=i)
                stats = self._collect(i, bar)
                self._replace_weights(i, quantize_layer(i, stats))
                self._advance(i, bar)

    def _collect(self, i: int, bar: tqdm) -> dict[str, InputStats]:
        """Pass 1: the float layer on the current inputs, with hooks; its outputs are dropped."""
        layer = self.model.layers[i]
        stats = {p: InputStats(self.keep, True, self.hessian_share) for p in projections(layer)}
        hooks = [layer.get_submodule(p).register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
                 for p, s in stats.items()]
        try:
            for x, r in zip(self.hidden, self.residual):
                layer(x.clone(), None if r is None else r.clone(), *self._context(x, i))
                bar.update()
        finally:
            for h in hooks:
                h.remove()
        return {f"layers.{i}.{p}": s for p, s in stats.items()}

    def _advance(self, i: int, bar: tqdm) -> None:
        """Pass 2: the quantized layer's outputs become the next layer's inputs."""
        layer = self.model.layers[i]
        for b, (x, r) in enumerate(zip(self.hidden, self.residual)):
            self.hidden[b], self.residual[b] = layer(x, r, *self._context(x, i))
            bar.update()

    def _context(self, x: torch.Tensor, i: int) -> tuple:
        count = x.shape[0] // len(self.positions)
        return self.model.layer_rope(i), self.positions.repeat(count), self.meta[count], self.cache

    def _replace_weights(self, i: int, hf_weights: dict[str, torch.Tensor]) -> None:
        """HF-named float weights of layer i -> the engine's (fused) linears, repacked."""
        for name, w in self.family.convert_weights(hf_weights, self.args).items():
            self.model.get_submodule(name.removesuffix(".weight")).load_weight(w)
