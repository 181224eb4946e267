#!/usr/bin/env bash
# Installs what `make bench` compares geartask with, on top of scripts/install.sh:
# redis-server (Debian) for Celery and RQ, haproxy (Debian; only for the opt-in
# `--only geartask-haproxy` terminator comparison), and the bench extras (celery[redis], rq, redis,
# matplotlib, py-spy) in .venv. Opt-in: the tests and CI do not need any of it (the
# benchmark's smoke mode reports missing systems as skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing with apt-get: redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  echo "installing with apt-get: haproxy (optional: bench.py --only geartask-haproxy)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null || echo "haproxy not installed; geartask-haproxy will be skipped"
fi
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "bench extras installed: $(redis-server --version | cut -d' ' -f1-3)"
