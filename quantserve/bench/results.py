"""Benchmark results: percentile summaries, JSON / CSV files, PNG plots, terminal tables."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

PERCENTILES = (50, 95, 99)


def summary(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean and p50 / p95 / p99 of seconds, in ms by default; NaN when there are none."""
    if not values:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    v = np.asarray(values) * scale
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def flatten(result: dict, prefix: str = "") -> dict:
    """{"ttft_ms": {"p50": 3}} -> {"ttft_ms_p50": 3}: one CSV column per figure."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}_"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def write(rows: list[dict], json_path: str | None, csv_path: str | None) -> None:
    """One JSON document (a list of runs) and / or one CSV row per run."""
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    if csv_path:
        flat = [flatten(r) for r in rows]
        columns = list(dict.fromkeys(k for row in flat for k in row))
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table of the given (key, header) columns that some row has, numbers to 1 decimal."""
    columns = [c for c in columns if any(c[0] in flatten(r) for r in rows)]

    def cell(value) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    cells = [[header for _, header in columns]] + [[cell(flatten(r).get(key, "")) for key, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def try_plot(plot, *args) -> bool:
    """Draw one plot; a failure is one line on stderr, since the JSON and CSV are already written."""
    try:
        plot(*args)
        return True
    except Exception as error:  # noqa: BLE001 - any plotting failure must not lose measured results
        print(f"quantserve bench: plot {args[-1]} not written ({type(error).__name__}: {error})", file=sys.stderr)
        return False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(rows: list[dict], path: str) -> None:
    """Serving: TTFT / TPOT / ITL / e2e percentiles, one group of bars per metric and run."""
    plt = _pyplot()
    metrics = ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            values = [row[metric][k] for k in ("mean", "p50", "p95", "p99")]
            ax.bar(np.arange(4) + i * width, values, width, label=f"concurrency {row['concurrency']}")
        ax.set_xticks(np.arange(4) + 0.4 - width / 2, ["mean", "p50", "p95", "p99"])
        ax.set_title(metric.replace("_ms", " (ms)").upper())
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(rows: list[dict], x: str, ys: list[tuple[str, str]], xlabel: str, title: str, path: str,
               ylabel: str = "tokens/s") -> None:
    """One line per (key, label) against x: throughput vs concurrency, tokens/s vs batch, TTFT vs turn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label in ys:
        ax.plot([r[x] for r in rows], [flatten(r)[key] for r in rows], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
