#!/usr/bin/env bash
# Both doors of one server on three variants of it (bench/serve_variant.py: as it is, without the per-message
# socket backlog ioctl, with a 0.2 ms GIL switch interval): one stream of 128 tokens over the WebSocket door and then
# the SSE door, with the engine steps each took, then 32 streams; for the server as it is, py-spy profiles with
# native frames of its threads while one stream runs over each door ($OUT/pyspy-ws.txt, $OUT/pyspy-sse.txt); first
# the machine's kernel and what a syscall costs there. Written to find why the WebSocket door looked slower than SSE
# on an H200: it was slower in every variant, with the engine's own steps longer, and the profiles of the two doors
# alike. The cause was the order: the WebSocket run came first after the start, and bench/cold_start.sh showed that
# the first run is 2-3x slower whichever door carries it (docs/benchmarks.md).
#
#   OUT=/tmp/diag bash bench/ws_diag.sh MODEL_FOLDER "--device cuda --dtype bfloat16"
set -u
model=$1
flags=${2:-}
OUT=${OUT:-/tmp/ws-diag}
mkdir -p "$OUT"
spy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null || true)
port=18931
uname -r; nproc
python3 -c "import sys, uvloop, websockets, uvicorn; print('python', sys.version.split()[0], 'uvloop', uvloop.__version__, 'websockets', websockets.__version__, 'uvicorn', uvicorn.__version__)"
python3 - <<'PY'
import array, fcntl, os, socket, termios, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
buf, n = array.array("i", [0]), 20000
def each(f):
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6
print("syscall cost, us: getppid %.2f  ioctl(TIOCOUTQ) %.2f  send+recv 100 B %.2f" % (
    each(os.getppid), each(lambda: fcntl.ioctl(c.fileno(), termios.TIOCOUTQ, buf)),
    each(lambda: (c.send(b"x" * 100), s.recv(4096)))))
PY
steps() { curl -s "127.0.0.1:$port/v1/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['engine']['steps'])"; }
doors() {  # streams tokens
    for mode in tokenwire openai; do
        url="ws://127.0.0.1:$port/"; [ $mode = openai ] && url="http://127.0.0.1:$port"
        before=$(steps)
        timeout 60 python3 bench/loadgen.py --url "$url" --mode $mode --model "$name" --streams "$1" \
            --max-tokens "$2" 2>&1 | grep '^\['
        echo "   engine steps during that run (warm-up included): $(( $(steps) - before ))"
    done
}
for variant in "" "--no-backlog" "--switch-interval 0.0002"; do
    echo "== tokenwire serve $flags ($variant)"
    # shellcheck disable=SC2086
    python3 bench/serve_variant.py $variant serve --engine transformers --model "$model" --port $port \
        --log-level warning $flags >"$OUT/ws-diag-server.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 0.5; done
    name=$(curl -s "127.0.0.1:$port/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
    doors 1 128
    if [ -z "$variant" ] && [ -n "$spy" ]; then
        for mode in tokenwire openai; do
            url="ws://127.0.0.1:$port/"; [ $mode = openai ] && url="http://127.0.0.1:$port"
            timeout 60 python3 bench/loadgen.py --url "$url" --mode $mode --model "$name" --streams 1 \
                --max-tokens 512 --no-warmup >/dev/null 2>&1 &
            load=$!
            sleep 1
            file=pyspy-ws.txt; [ $mode = openai ] && file=pyspy-sse.txt
            timeout 20 "$spy" record -p $server -d 3 -r 200 --threads --native -f raw -o "$OUT/$file" 2>&1 | tail -1
            wait $load
        done
    fi
    doors 32 128
    curl -s "127.0.0.1:$port/metrics" | grep -E '^tokenwire_(flow_pauses|websocket_messages_sent|generation_tokens)_total'
    kill $server; wait $server 2>/dev/null
done
