#!/usr/bin/env bash
# Installs what geartask needs on a Debian machine: gearmand, the C gearman tools,
# iproute2 (the network tests build hosts with 'ip netns'), systemd's systemd-analyze (the
# deploy/ units are verified with it), chromium and chromium-driver (the dashboard's browser
# tests), promtool (Debian's prometheus package: /metrics is checked with it), stunnel4
# (server.tls: the TLS terminator in front of gearmand) and postgresql (the PostgreSQL
# outcome store and gearmand's libpq queue are tested on a real one) and libsodium23 (the
# fast Ed25519 path of signed jobs) from apt
# (only when missing), then a venv in .venv with geartask and its test extras.
# Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v gearmand >/dev/null 2>&1 || [ -x /usr/sbin/gearmand ] || need_apt+=(gearman-job-server)
command -v gearadmin >/dev/null 2>&1 || need_apt+=(gearman-tools)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need_apt+=(iproute2)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v stunnel >/dev/null 2>&1 || command -v stunnel4 >/dev/null 2>&1 || need_apt+=(stunnel4)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# libsodium: signed jobs' Ed25519 at half the CPU (geartask/trust/sodium.py; optional at run time)
ldconfig -p 2>/dev/null | grep -q 'libsodium\.so' || need_apt+=(libsodium23)
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_apt+=(python3 python3-venv python3-pip)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing with apt-get: ${need_apt[*]}"
  $SUDO apt-get update -qq
  # --no-install-recommends: prometheus would bring node-exporter; only promtool is wanted
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian puts gearmand in /usr/sbin, which a normal user's PATH may lack.
export PATH="$PATH:/usr/sbin"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "geartask needs Python 3.10 or newer")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/python -c 'import geartask; print("geartask", geartask.__version__)'), $(gearmand --version 2>&1 | grep -m1 .)"
