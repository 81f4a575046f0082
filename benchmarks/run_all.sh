#!/usr/bin/env bash
# Every benchmark, then BENCHMARKS.md. About 4 hours on 2 cores (the weight-quality table is
# most of it). The llama.cpp comparison needs `pip install llama-cpp-python sse-starlette
# starlette-context` first (it builds llama.cpp from source).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_engine.py
python benchmarks/profile_decode.py
python benchmarks/bench_kv_quant.py
python benchmarks/bench_prefix_cache.py
python benchmarks/bench_weight_quant.py
rm -f benchmarks/results/weight_quality.json     # it resumes from this file; start afresh
python benchmarks/bench_weight_quality.py --max-windows 10
python benchmarks/bench_llamacpp.py
python benchmarks/report.py
