"""benchmarks/soak.py, briefly, on the tiny model: every kind of traffic goes through a real
api_server, nothing fails unexpectedly, and the engine is clean afterwards."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["chat", "chat_stream_usage", "completion", "n_choices", "tools", "json_schema", "logprobs",
             "dropped_stream", "bad_request"]


@pytest.mark.slow
def test_the_soak_harness_runs_every_scenario_and_checks_the_engine(tiny_server_model, tmp_path):
    cmd = [sys.executable, "benchmarks/soak.py", "--model", str(tiny_server_model), "--duration", "25",
           "--warmup", "5", "--interval", "5", "--clients", "6", "--label", "t", "--max-words", "60", "--results", str(tmp_path),
           "--server-args", "--dtype float32 --cache-max-tokens 8192 --session-len 2048 --num-threads 1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "soak-t.json").is_file(), f"soak.py exited {done.returncode}: {done.stderr[-3000:]}"
    result = json.loads((tmp_path / "soak-t.json").read_text())
    assert result["outcomes"].get("unexpected error", 0) == 0, result["errors"]
    for name in SCENARIOS:
        assert sum(n for key, n in result["outcomes"].items() if key.startswith(f"{name}: ")) > 0, name
    assert result["outcomes"]["bad_request: refused as expected"] > 0
    engine = result["engine_after"]
    assert engine["running"] == engine["waiting"] == 0 and engine["kv_blocks_free"] == engine["kv_blocks"] > 0
    assert len(result["samples"]) >= 5 and all(s["rss_mb"] > 0 for s in result["samples"])
    assert (tmp_path / "soak-t.png").stat().st_size > 10_000 and "RSS growth after warm-up" in done.stdout
