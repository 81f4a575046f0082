"""Benchmark workloads: synthetic prompts cut from bundled text, or a ShareGPT-format JSON file.

Synthetic prompts are windows of real English (the bundled WikiText-2 split) at seeded random
offsets, so they decode to text that re-tokenizes to about the same length on any server, and
no two share a prefix the cache could reuse.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MAX_SHAREGPT_PROMPT = 1024      # vLLM's ShareGPT filter: drop longer prompts and tiny ones
MIN_SHAREGPT_TOKENS = 4
SYNTHETIC_CHARS = 400_000       # prompts are cut from this much of the text (~100k tokens)


@dataclass
class BenchRequest:
    prompt: str
    prompt_ids: list[int]
    output_len: int


def synthetic(tokenizer, num: int, input_len: int, output_len: int, seed: int = 0) -> list[BenchRequest]:
    from quantserve.bench.perplexity import dataset_text

    text = dataset_text("wikitext2")
    ids = tokenizer.encode(text[:max(SYNTHETIC_CHARS, 64 * input_len)], add_special_tokens=False)
    if len(ids) <= input_len:
        raise ValueError(f"--input-len {input_len}: longer than the bundled text ({len(ids)} tokens)")
    rng = random.Random(seed)
    requests = []
    for _ in range(num):
        start = rng.randrange(0, len(ids) - input_len)
        window = ids[start:start + input_len]
        requests.append(BenchRequest(tokenizer.decode(window), window, output_len))
    return requests


def sharegpt(tokenizer, path: str, num: int, output_len: int | None, seed: int = 0) -> list[BenchRequest]:
    """First human turn as the prompt; the first reply's length as the output length unless given."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--dataset {path}: not a readable ShareGPT JSON file ({e})") from None
    pairs = [_first_exchange(row) for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []
    pairs = [p for p in pairs if p is not None]
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        long_enough = output_len or n_out >= MIN_SHAREGPT_TOKENS          # the filter is on recorded replies
        if MIN_SHAREGPT_TOKENS <= len(prompt_ids) <= MAX_SHAREGPT_PROMPT and long_enough:
            requests.append(BenchRequest(prompt, prompt_ids, n_out))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"--dataset {path}: no usable conversations (a JSON list of "
                         '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})')
    return requests


def _first_exchange(row: dict) -> tuple[str, str] | None:
    turns = row.get("conversations") or row.get("conversation") or []
    if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    prompt, reply = turns[0].get("value"), turns[1].get("value")
    return (prompt, reply) if isinstance(prompt, str) and isinstance(reply, str) else None


def load(tokenizer, dataset: str | None, num: int, input_len: int, output_len: int | None,
         seed: int) -> list[BenchRequest]:
    if num < 1:
        raise ValueError("--num-prompts must be at least 1")
    if dataset in (None, "random", "synthetic"):
        if input_len < 1 or not output_len or output_len < 1:
            raise ValueError("--input-len and --output-len must be at least 1")
        return synthetic(tokenizer, num, input_len, output_len, seed)
    return sharegpt(tokenizer, dataset, num, output_len, seed)
