#!/usr/bin/env bash
# The eg demo, end to end: install, start a local gearmand on a free loopback port, start
# workers, send the eg plugin's jobs, show status and workers, shut the workers down, stop
# the server. Everything it makes lives in var/demo/ (config, logs, sqlite queue).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PATH:/usr/sbin"
PY=.venv/bin/python
GT=.venv/bin/geartask
DEMO=var/demo
mkdir -p "$DEMO"
PORT=$($PY -c 'from geartask.server import free_port; print(free_port())')
cat > "$DEMO/config.yaml" <<YAML
servers: ["127.0.0.1:$PORT"]
log: {dir: logs}
plugins: {paths: [../../plugins]}
worker:
  shell: {allow: [echo, uname]}
server:
  port: $PORT
  queue: {type: sqlite, path: queue.sqlite}
YAML
export GEARTASK_CONFIG="$PWD/$DEMO/config.yaml"
worker_pid=""
cleanup() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null || true
  $GT manage server stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
step "start a local gearmand on 127.0.0.1:$PORT"
$GT manage server start

step "start 4 workers named demo (log: $DEMO/logs/worker-demo.log)"
$GT worker --name demo --threads 4 2>>"$DEMO/worker-console.log" &
worker_pid=$!
for _ in $(seq 100); do
  $GT manage workers --no-ping --json 2>/dev/null | grep -q '"name": *"demo"' && break
  sleep 0.1
done

step "send the eg plugin's jobs and wait for them"
$GT send plugin eg

step "server status"
$GT manage status

step "workers"
$GT manage workers

step "shut the workers down"
$GT manage shutdown --name demo
wait "$worker_pid" && worker_pid=""

step "stop the server"
$GT manage server stop
trap - EXIT
echo "demo complete"
