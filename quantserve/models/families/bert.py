"""BERT (encoder only): sentence embedding models (all-MiniLM, BGE, E5 …) and cross-encoder
rerankers (`BertForSequenceClassification`).

Post-norm layers: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x)). Absolute position and token
type embeddings are added to the word embeddings and normalized. Attention is bidirectional, so
the only mask is padding. Not a decoder: this family has no `FAMILY`, it is found by
`ENCODER_TYPES` and runs in engine/encoder.py, outside the paged cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

ENCODER_TYPES = ("bert",)


@dataclass(frozen=True)
class BertArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    eps: float
    act: str
    num_labels: int          # 0: an embedding model; else a classifier head (a cross-encoder)

    @classmethod
    def from_config(cls, cfg: dict) -> BertArgs:
        classifies = any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])
        labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                   cfg.get("layer_norm_eps", 1e-12), cfg.get("hidden_act", "gelu"), labels if classifies else 0)


class BertLayer(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        h = a.hidden_size
        self.heads = a.num_heads
        self.qkv = nn.Linear(h, 3 * h)          # query, key and value fused: one matmul
        self.o = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=a.eps)
        self.up = nn.Linear(h, a.intermediate_size)
        self.down = nn.Linear(a.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=a.eps)
        self.act = (lambda t: F.gelu(t, approximate="tanh")) if a.act in ("gelu_new", "gelu_pytorch_tanh") else F.gelu

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, H]; mask: [B, 1, 1, T] True at real tokens (None: no padding)."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)   # [B, nh, T, d]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.o(attn.transpose(1, 2).reshape(b, t, h)))
        return self.mlp_norm(x + self.down(self.act(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        self.args = a
        self.word = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.embed_norm = nn.LayerNorm(a.hidden_size, eps=a.eps)
        self.layers = nn.ModuleList(BertLayer(a) for _ in range(a.num_layers))
        if a.num_labels:
            self.pooler = nn.Linear(a.hidden_size, a.hidden_size)
            self.classifier = nn.Linear(a.hidden_size, a.num_labels)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids, type_ids: [B, T] right-padded; lengths: [B] -> hidden states [B, T, H]."""
        positions = torch.arange(ids.shape[1])
        x = self.embed_norm(self.word(ids) + self.position(positions) + self.token_type(type_ids))
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)                  # [B, T]
        mask = None if bool(real.all()) else real[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, num_labels] logits from the first token, through BERT's tanh pooler."""
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


# HF checkpoint names (a bare BertModel, or under `bert.` in a task model) -> ours
RENAMES = [
    ("embeddings.word_embeddings.", "word."), ("embeddings.position_embeddings.", "position."),
    ("embeddings.token_type_embeddings.", "token_type."), ("embeddings.LayerNorm.", "embed_norm."),
    ("attention.output.dense.", "o."), ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "up."), ("output.dense.", "down."), ("output.LayerNorm.", "mlp_norm."),
    ("encoder.layer.", "layers."), ("pooler.dense.", "pooler."),
]
QKV = ("attention.self.query.", "attention.self.key.", "attention.self.value.")


def convert_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours, query/key/value concatenated into qkv."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in weights.items():
        name = name.removeprefix("bert.")
        if name.endswith("position_ids"):
            continue
        for i, part in enumerate(QKV):
            if part in name:
                fused = name.replace("encoder.layer.", "layers.").replace(part, "qkv.")
                parts.setdefault(fused, {})[i] = tensor
                break
        else:
            for old, new in RENAMES:
                name = name.replace(old, new)
            out[name] = tensor
    out.update({name: torch.cat([p[0], p[1], p[2]]) for name, p in parts.items()})
    return out


def load_bert(path: Path, dtype: torch.dtype = torch.float32) -> BertEncoder:
    """A BERT checkpoint directory (config.json + safetensors) -> the encoder, in eval mode."""
    cfg = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        model = BertEncoder(BertArgs.from_config(cfg))
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(shard))
    if not weights:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    state = convert_weights(weights)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)[:4]} …")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in model.state_dict()}, assign=True)
    return model.eval()

