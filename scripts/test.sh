#!/usr/bin/env bash
# The test command: install everything, then run the whole test suite against real gearmand.
# Extra arguments go to pytest (e.g. scripts/test.sh -k worker -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint and type check first (configured in pyproject.toml); set -e stops at the first that fails.
.venv/bin/ruff check .
.venv/bin/mypy
export PATH="$PATH:/usr/sbin"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests ran: that is a failure" >&2
  exit 1
fi
exit "$status"
