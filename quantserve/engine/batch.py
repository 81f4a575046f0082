"""Rows of new tokens -> the flat batch a model's forward takes: input ids, positions, cache slots
and the attention metadata (decodes batched, prefill chunks one by one).

A row marked `decodes` (a speculative verify row: last token + draft; a draft model's short
catch-up) is run as decodes: one entry per token, each with the row's block table and its own
context length. The model writes a step's K/V before it attends, so each token sees the ones
before it; the row then takes the fused one-call decode step, with the weights read once for all
its tokens, instead of the layer-by-layer prefill path, and each token's numbers are a decode's,
whatever the batch (greedy output with drafts is token for token the output without). Prompts
stay chunks, so their numbers do not depend on how a prompt was split.
"""
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
    decodes: bool = False       # run as one decode per token (see the top); a single token always is


def flat_batch(rows: list[Row], block_size: int, device: str
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
    """Rows -> input ids [T], positions [T], the attention metadata, and where each row's tokens
    start in T: rows run as decodes come first (in their order), then the prefill chunks."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    prefills: list[PrefillChunk] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    starts = [0] * len(rows)
    decodes = {i for i, row in enumerate(rows) if row.decodes or len(row.tokens) == 1}
    for i in sorted(range(len(rows)), key=lambda i: i not in decodes):      # stable: decodes first
        row, starts[i] = rows[i], len(ids)
        stop = row.start + len(row.tokens)
        nblk = -(-stop // block_size)                      # the blocks its context fills (more may be held)
        if i in decodes:
            decode_tables.extend([row.block_ids[:nblk]] * len(row.tokens))
            decode_lens.extend(range(row.start + 1, stop + 1))
        else:
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
    return torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta, starts


def _decode_mask(lens: list[int], block_size: int, device: str) -> torch.Tensor:
    """[B, 1, 1, S] True where a key position is inside the request's context."""
    width = max((-(-n // block_size) for n in lens), default=0) * block_size
    pos = torch.arange(width, device=device)
    lens_t = torch.tensor(lens, device=device).unsqueeze(1)
    return (pos.unsqueeze(0) < lens_t).view(len(lens), 1, 1, width)
