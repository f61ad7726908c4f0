#!/usr/bin/env bash
# The GPU check, as one script for a lent GPU machine (docs/benchmarks.md, "The transformers engine on a GPU"):
# the engine tests and the e2e suites on CUDA, then tokenwire against `transformers serve --continuous-batching`
# on the same card, the same weights (random, in the default model's architecture and a larger one), in turns.
#
# That machine has Python 3.12 with its own PyTorch but not tokenwire's other packages, and reaches no registry:
# the missing ones travel as wheels in .whl/, the default model's tokenizer in .gpu/tokenizer (bench/README.md
# says how to make both). Run from the repository root; results go to $OUT (default /tmp/gpu-check).
#
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh [tests-seconds] [bench-seconds] [diagnosis-seconds]
#
# A part given 0 seconds is skipped. STREAMS=1,8,32 changes the bench's stream counts on the 135M architecture;
# LARGE=0 skips the 1.7B one. The whole test log is $OUT/tests.log.
#
# The third part (bench/cold_start.sh, on the 135M architecture) runs one stream over the SSE and WebSocket doors
# in alternation on a fresh server: on an H200 the first run after the start was 2-3x slower whichever door carried
# it, which is why the bench warms every server up with one untimed round at each stream count (--warmup-rounds).
set -u
OUT=${OUT:-/tmp/gpu-check}
TEST_S=${1:-170}
BENCH_S=${2:-330}
DIAG_S=${3:-0}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="$PWD/src:$PWD:/tmp/site" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 bench/random_model.py --arch smollm2-135m --tokenizer .gpu/tokenizer --out /tmp/m135 --device cuda >/dev/null
[ "${LARGE:-1}" = 1 ] && python3 bench/random_model.py --arch smollm2-1.7b --tokenizer .gpu/tokenizer --out /tmp/m1p7 --device cuda >/dev/null

# (pytest-xdist spreads the tests over 8 processes, each with its own servers; the tests' unit is one GPU)
[ "$TEST_S" -gt 0 ] && echo "== tests on CUDA ($TEST_S s at most)" && TOKENWIRE_TEST_DEVICE=cuda timeout "$TEST_S" \
    python3 -m pytest -p no:cacheprovider --tb=line --timeout 60 -n 8 -rf \
    -W default::DeprecationWarning -W default::FutureWarning -W default::UserWarning \
    tests/unit/test_hf_engine.py tests/unit/test_scheduler.py tests/unit/test_block_manager.py \
    tests/e2e/test_websocket.py tests/e2e/test_resume.py tests/e2e/test_openai.py tests/e2e/test_realtime.py \
    tests/e2e/test_responses.py >"$OUT/tests.log" 2>&1; tail -40 "$OUT/tests.log"

[ "$DIAG_S" -gt 0 ] && echo "== a fresh server's first runs ($DIAG_S s at most)" && timeout "$DIAG_S" \
    bash bench/cold_start.sh /tmp/m135 "--device cuda --dtype bfloat16" 2>&1 | tee "$OUT/cold-start.log"

[ "$BENCH_S" -gt 0 ] || exit 0  # (timeout 0 would mean no limit)
echo "== tokenwire against transformers serve ($BENCH_S s at most)"
runs=/tmp/gpu-peers
mkdir -p "$runs"
common=(--engines transformers --transformers /tmp/site/bin/transformers --transformers-dtype bfloat16
    --transformers-args "--cb-max-memory-percent 0.4" --rounds 1 --warmup-rounds 1 --max-tokens 128 --timeout 120)
tw="--device cuda --dtype bfloat16 --max-batch-size 256 --max-waiting 4096 --log-level warning"
timeout "$BENCH_S" bash -c "$(printf '%q ' python3 bench/peers.py "${common[@]}" --model /tmp/m135 \
    --tokenwire-args "$tw" --streams "${STREAMS:-1,8,32,64,256}" --out "$runs/peers-gpu-135m.json") \
    && [ "${LARGE:-1}" = 1 ] && $(printf '%q ' python3 bench/peers.py "${common[@]}" --model /tmp/m1p7 \
    --tokenwire-args "$tw" --streams 1,32,64 --out "$runs/peers-gpu-1.7b.json")" 2>&1 | tail -60
cp "$runs"/*.json "$OUT"/ 2>/dev/null
{
    for f in "$runs"/*.log; do echo "== $f"; tail -40 "$f"; done
    for f in "$runs"/*.metrics; do echo "== $f"; grep -v -e '^#' -e '_created' "$f" | grep -v ' 0.0$'; done
} >"$OUT/server-logs.txt"
for f in "$runs"/*.md; do echo "== $f"; cat "$f"; done
