"""How a model turns hidden states into one vector: read from its sentence-transformers files
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), else the caller's choice."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# 1_Pooling/config.json's switches -> our pooling kinds
MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


@dataclass(frozen=True)
class PoolingConfig:
    kind: str | None          # mean | cls | last; None: not an embedding model by its files
    normalize: bool
    max_length: int | None    # inputs are truncated to this many tokens (sentence-transformers' max_seq_length)


def sentence_config(path: Path) -> PoolingConfig:
    """The pooling a sentence-transformers directory declares (no files: nothing declared)."""
    modules = _read(path / "modules.json") or []
    pool_dir = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")), None)
    pool = _read(path / pool_dir / "config.json") if pool_dir else None
    kinds = [kind for key, kind in MODES.items() if (pool or {}).get(key)]
    if pool is not None and len(kinds) != 1:
        raise ValueError(f"{path / pool_dir}: one of mean, CLS or last-token pooling must be on, not {kinds or 'none'}")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    st = _read(path / "sentence_bert_config.json") or {}
    return PoolingConfig(kinds[0] if kinds else None, normalize, st.get("max_seq_length"))


def _read(file: Path) -> dict | list | None:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
