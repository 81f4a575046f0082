"""Parsers of the values flags and requests spell as text: sizes, durations, JSON objects, KV
cache policies. Each raises ValueError with a message that shows what it expected."""
from __future__ import annotations

import json
import re

SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """'24GB' -> 24e9, '2GiB' -> 2 * 2**30, '512M' -> 512e6 bytes."""
    m = SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 24GB, 2GiB, 512MB)")
    power = " kmgt".index(m.group(2).lower() or " ")
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: str | float) -> float:
    """Ollama's keep_alive, in seconds: '5m', '30s', '1h30m', '500ms' or a number of seconds;
    0: none; negative ('-1'): forever (inf)."""
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        body = text.removeprefix("-")
        parts = DURATION_RE.findall(body)
        if not parts or "".join(n + u for n, u in parts) != body:
            raise ValueError(f"not a duration: {value!r} (examples: 5m, 30s, 1h, 0, -1)") from None
        seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts) * (-1 if text.startswith("-") else 1)
    if seconds != seconds:
        raise ValueError(f"not a duration: {value!r}")
    return float("inf") if seconds < 0 else seconds


def fraction_or_size(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def quant_policy(text: str) -> int:
    names = {"none": 0, "int8": 8, "int4": 4, "0": 0, "8": 8, "4": 4}
    if text.lower() not in names:
        raise ValueError(f"choose from 0/none, 8/int8, 4/int4 (got {text!r})")
    return names[text.lower()]
