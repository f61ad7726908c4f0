#!/usr/bin/env bash
# Is a door slower, or the first run after the server starts? One stream of 128 tokens over the SSE door, the
# WebSocket door, SSE, WebSocket, in that order, on a fresh server, with the engine steps each took; then again
# with the server pinned to CPUs 2-7 and the load generator to CPU 12 (where the machine has them). On an H200
# this showed that the first run after the start is 2-3x slower whichever door carries it (docs/benchmarks.md).
#
#   bash bench/cold_start.sh MODEL_FOLDER "--device cuda --dtype bfloat16"
set -u
model=$1
flags=${2:-}
port=18931
steps() { curl -s "127.0.0.1:$port/v1/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['engine']['steps'])"; }
one() {  # PIN MODE
    url="ws://127.0.0.1:$port/"; [ "$2" = openai ] && url="http://127.0.0.1:$port"
    before=$(steps)
    # shellcheck disable=SC2086
    timeout 60 $1 python3 bench/loadgen.py --url "$url" --mode "$2" --model "$name" --streams 1 --max-tokens 128 \
        2>&1 | grep '^\['
    echo "   engine steps: $(( $(steps) - before ))"
}
pins=("")
[ "$(nproc)" -ge 13 ] && pins+=("taskset -c 2-7")
for pin in "${pins[@]}"; do
    echo "== a fresh server, pinned: '$pin'"
    # shellcheck disable=SC2086
    $pin python3 -m tokenwire.cli serve --engine transformers --model "$model" --port $port --log-level warning \
        $flags >/tmp/cold-start-server.log 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 0.5; done
    name=$(curl -s "127.0.0.1:$port/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
    load=""; [ -n "$pin" ] && load="taskset -c 12"
    for mode in openai tokenwire openai tokenwire; do one "$load" $mode; done
    kill $server; wait $server 2>/dev/null
done
