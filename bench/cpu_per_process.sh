#!/usr/bin/env bash
# CPU time of tokenwire's server process and of its OpenVINO worker under the same load over WebSocket and
# over SSE, in turns (docs/benchmarks.md): which process pays for what.
#   bash bench/cpu_per_process.sh [STREAMS] [MAX_TOKENS]      (on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
streams=${1:-64}; max_tokens=${2:-64}; port=18950
tokenwire serve --port $port --log-level warning > /tmp/tokenwire-cpu-per-process.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:$port/ready >/dev/null && break; sleep 1; done
worker=$(pgrep -f "multiprocessing.spawn" -P $server | head -1)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }  # user + system, in clock ticks (getconf CLK_TCK)
for mode in tokenwire openai tokenwire openai; do
  url=ws://127.0.0.1:$port/; [ $mode = openai ] && url=http://127.0.0.1:$port
  s0=$(ticks $server); w0=$(ticks $worker)
  result=$(python bench/loadgen.py --url $url --mode $mode --model SmolLM2-135M-Instruct --streams "$streams" \
    --max-tokens "$max_tokens" 2>&1 | grep -o "tokens=[0-9]* wall=[0-9.]*s tok/s=[0-9.]*")
  echo "$mode $result server_ticks=$(( $(ticks $server) - s0 )) worker_ticks=$(( $(ticks $worker) - w0 ))"
done
