#!/usr/bin/env bash
# The tutorials' homework on the default model: quantize it to W4A16 with AWQ (once; cached),
# start the OpenAI-compatible server on it with an int4 KV cache (it prints its memory table),
# wait until /health is ready, ask one question through the official openai client, print the
# reply, stop the server.
set -euo pipefail
cd "$(dirname "$0")"
PORT=${PORT:-23333}
MODEL=$(quantserve default-model)
W4A16=${QUANTSERVE_HOME:-$HOME/.cache/quantserve}/work/SmolLM2-135M-Instruct-w4a16
if [ ! -f "$W4A16/config.json" ]; then
    # the tutorial's flags, with a calibration set small enough for a first run (about a minute);
    # group 64 because this model's 576-wide layers are not a multiple of 128
    quantserve lite auto_awq "$MODEL" --calib-dataset ptb --calib-samples 32 --calib-seqlen 512 \
        --w-bits 4 --w-group-size 64 --batch-size 1 --search-scale False --work-dir "$W4A16"
fi
quantserve serve api_server "$W4A16" --model-format awq --quant-policy 4 --cache-max-entry-count 0.4 \
    --server-name 0.0.0.0 --server-port "$PORT" --tp 1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$SERVER" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
    except OSError:
        os.kill(pid, 0)          # the server died: stop waiting
        time.sleep(0.5)
PY
python openai_client.py --base-url "http://127.0.0.1:$PORT/v1"
