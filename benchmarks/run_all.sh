#!/usr/bin/env bash
# Every benchmark, then BENCHMARKS.md. About 5 hours on 2 cores (the weight-quality table and
# the 60-minute soak are most of it). The llama.cpp comparison builds llama.cpp's own tools
# natively once (../shared/tools/llamacpp.sh, about 8 minutes). The soak's "before" row is kept
# from the run that measured the code before the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_engine.py
python benchmarks/profile_decode.py
python benchmarks/bench_kv_quant.py
python benchmarks/bench_workspace.py
python benchmarks/bench_smooth_quant.py
python benchmarks/bench_prefix_cache.py
python benchmarks/bench_ws_session.py
python benchmarks/bench_speculative.py
python benchmarks/bench_lora.py
python benchmarks/bench_embeddings.py
python benchmarks/bench_weight_quant.py
rm -f benchmarks/results/weight_quality.json     # it resumes from this file; start afresh
python benchmarks/bench_weight_quality.py --max-windows 10
../shared/tools/llamacpp.sh >/dev/null
python benchmarks/bench_llamacpp.py
python benchmarks/bench_shapes.py
python benchmarks/bench_isa.py
python benchmarks/bench_head_bits.py
python benchmarks/soak.py --duration 3600 --label after
python benchmarks/report.py
