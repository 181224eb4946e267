#!/usr/bin/env bash
# The test command: install everything, then run the whole test suite against real gearmand.
# Extra arguments go to pytest (e.g. scripts/test.sh -k worker -x).
# The tests mostly wait (on gearmand, workers, timeouts, faults), so they run in parallel with
# pytest-xdist: GEARTASK_TEST_WORKERS processes (default 4: on 2 cores more processes only
# starve the timing-sensitive tests of CPU). Arguments that choose for themselves (-n N,
# --numprocesses N, -p no:xdist) or ask to see the tests' output (-s) get one process instead.
# --dist loadgroup keeps the tests of one xdist_group (a shared expensive fixture) together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint first (configured in pyproject.toml; set -e stops here if it fails). The type check runs
# beside the tests, which mostly wait: its report comes only when it fails, and fails the run.
.venv/bin/ruff check .
mypy_log=$(mktemp)
.venv/bin/mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
export PATH="$PATH:/usr/sbin"

parallel=(-n "${GEARTASK_TEST_WORKERS:-4}" --dist loadgroup)
prev=""
for arg in "$@"; do
  case "$arg" in
    -n|-n[0-9]*|-nauto|-nlogical|--numprocesses|--numprocesses=*|-pno:xdist) parallel=() ;;
    -s|--capture=no) parallel=() ;;  # to see the tests' output: xdist's workers would swallow it
    no:xdist) if [ "$prev" = "-p" ]; then parallel=(); fi ;;
  esac
  prev="$arg"
done

set +e
.venv/bin/python -m pytest ${parallel[@]+"${parallel[@]}"} "$@"
status=$?
wait "$mypy_pid"
mypy_status=$?
set -e
if [ "$mypy_status" -ne 0 ]; then
  cat "$mypy_log" >&2
  rm -f "$mypy_log"
  echo "mypy found problems (above): that is a failure" >&2
  exit 1
fi
rm -f "$mypy_log"
if [ "$status" -eq 5 ]; then
  echo "no tests ran: that is a failure" >&2
  exit 1
fi
exit "$status"
