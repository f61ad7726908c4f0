#!/usr/bin/env bash
# Why is the WebSocket door slower than the SSE door of the same server? (On an H200 it was, 11 against 35 tok/s
# for one stream; on the CPU it is not: docs/benchmarks.md.) One stream, 256 tokens, over each door in turn:
# with the default flow control and with --max-unsent-tokens 0 (a generation is never paused for its reader),
# each server's flow-control counters, and where the server's threads spend their time while a WebSocket stream
# runs (py-spy, if installed: all threads, then only the one holding the GIL), written to $OUT.
#
#   OUT=/tmp/diag bash bench/ws_diag.sh MODEL_FOLDER "--device cuda --dtype bfloat16"
set -u
model=$1
flags=${2:-}
OUT=${OUT:-/tmp/ws-diag}
mkdir -p "$OUT"
spy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null || true)
port=18931
for variant in "" "--max-unsent-tokens 0"; do
    echo "== tokenwire serve $flags $variant"
    # shellcheck disable=SC2086
    python3 -m tokenwire.cli serve --engine transformers --model "$model" --port $port --log-level warning \
        $flags $variant >"$OUT/ws-diag-server.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 0.5; done
    name=$(curl -s "127.0.0.1:$port/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
    for mode in tokenwire openai tokenwire openai; do
        url="ws://127.0.0.1:$port/"; [ $mode = openai ] && url="http://127.0.0.1:$port"
        timeout 60 python3 bench/loadgen.py --url "$url" --mode $mode --model "$name" --streams 1 --max-tokens 256 \
            2>&1 | grep '^\['
    done
    if [ -z "$variant" ] && [ -n "$spy" ]; then
        for how in threads gil; do
            timeout 60 python3 bench/loadgen.py --url "ws://127.0.0.1:$port/" --streams 1 --max-tokens 512 \
                >/dev/null 2>&1 &
            load=$!
            sleep 1
            extra=(--threads); [ $how = gil ] && extra=(--threads --gil)
            timeout 30 "$spy" record -p $server -d 4 -r 250 "${extra[@]}" -f raw -o "$OUT/pyspy-$how.txt" 2>&1 | tail -1
            wait $load
        done
    fi
    curl -s "127.0.0.1:$port/metrics" | grep -E '^tokenwire_(flow_pauses|websocket_messages_sent|generation_tokens)_total'
    kill $server; wait $server 2>/dev/null
done
