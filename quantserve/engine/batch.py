"""Rows of new tokens -> the flat batch a model's forward takes: input ids, positions, cache slots
and the attention metadata (decodes batched, prefill chunks one by one)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantserve.kvcache.paged import AttentionMetadata, PrefillChunk


@dataclass
class Row:
    """One request's run of new tokens in the flat batch."""

    tokens: list[int]
    start: int                  # position of the first
    block_ids: list[int]        # the request's block table (holding start + len(tokens) tokens)


def flat_batch(rows: list[Row], block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Rows (single-token ones first) -> input ids [T], positions [T] and the attention metadata."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    prefills: list[PrefillChunk] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    for row in rows:
        stop = row.start + len(row.tokens)
        if len(row.tokens) == 1:
            decode_tables.append(row.block_ids)
            decode_lens.append(stop)
        else:
            nblk = -(-stop // block_size)
            prefills.append(PrefillChunk(len(ids), len(row.tokens), stop,
                                         torch.tensor(row.block_ids[:nblk], device=device)))
        ids.extend(row.tokens)
        positions.extend(range(row.start, stop))
        slots.extend(row.block_ids[p // block_size] * block_size + p % block_size for p in range(row.start, stop))
    width = max((len(t) for t in decode_tables), default=0)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        num_decode=len(decode_tables),
        decode_block_tables=tables.view(len(decode_tables), width),
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=device),
        decode_mask=_decode_mask(decode_lens, block_size, device),
        prefills=prefills,
    )
    return torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta


def _decode_mask(lens: list[int], block_size: int, device: str) -> torch.Tensor:
    """[B, 1, 1, S] True where a key position is inside the request's context."""
    width = max((-(-n // block_size) for n in lens), default=0) * block_size
    pos = torch.arange(width, device=device)
    lens_t = torch.tensor(lens, device=device).unsqueeze(1)
    return (pos.unsqueeze(0) < lens_t).view(len(lens), 1, 1, width)
