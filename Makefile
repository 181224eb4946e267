# Benchmarks (issue 6). `make bench` needs the bench extras: scripts/install-bench.sh.
PY ?= .venv/bin/python

.PHONY: bench bench-smoke
bench:
	$(PY) bench/bench.py
	$(MAKE) bench-fleet

bench-smoke:
	$(PY) bench/bench.py --smoke --out $${BENCH_OUT:-/tmp/geartask-bench-smoke}

# Fleet of worker processes against two servers (bench/fleet.py): 1x8, 50x8 and the large 200x4.
FLEET_OUT ?= /tmp/geartask-fleet
.PHONY: bench-fleet soak
bench-fleet:
	$(PY) bench/fleet.py --processes 1 --threads 8 --jobs 3000 --runs 3 --json $(FLEET_OUT)/fleet-1x8.json
	$(PY) bench/fleet.py --processes 50 --threads 8 --jobs 3000 --runs 3 --json $(FLEET_OUT)/fleet-50x8.json
	$(PY) bench/fleet.py --processes 200 --threads 4 --jobs 3000 --runs 3 --json $(FLEET_OUT)/fleet-200x4.json

# Jobs under chaos for MINUTES (bench/soak.py); exit 0 when nothing is lost.
MINUTES ?= 30
soak:
	$(PY) bench/soak.py --minutes $(MINUTES)
