# Benchmarks (issue 6). `make bench` needs the bench extras: scripts/install-bench.sh.
PY ?= .venv/bin/python

.PHONY: bench bench-smoke
bench:
	$(PY) bench/bench.py

bench-smoke:
	$(PY) bench/bench.py --smoke --out $${BENCH_OUT:-/tmp/geartask-bench-smoke}
