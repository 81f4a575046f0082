#!/usr/bin/env bash
# The tutorials' homework on the default model: start the OpenAI-compatible server with an int4
# KV cache (it prints its memory table), wait until /health is ready, ask one question through the
# official openai client, print the reply, stop the server.
set -euo pipefail
cd "$(dirname "$0")"
PORT=${PORT:-23333}
quantserve serve api_server --quant-policy 4 --cache-max-entry-count 0.4 \
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
