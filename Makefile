# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install run test test-container bench bench-reports bench-multiprocess lint check-config clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

run: install                  ## start the gateway on 127.0.0.1:8080 (SQLite in ./data)
	$(BIN)/python proxy.py bootstrap --config config.yaml
	$(BIN)/python proxy.py serve --config config.yaml

test: install                 ## the whole suite
	$(BIN)/python -m pytest

bench: install                ## throughput/latency table (docs/performance.md)
	@# Debian's wrk where it can be had (a Python load generator takes the CPU the gateway is
	@# measured on); without it bench.py falls back to bench/load.py.
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1; }; }; } || \
	  echo "wrk not installed: the bench uses bench/load.py (apt-get install wrk for steadier figures)"
	$(BIN)/python bench/bench.py

bench-reports: install        ## reports and /admin/metrics at 10M usage rows (BENCH_REPORT_ROWS=N to lower)
	$(BIN)/python bench/reports_bench.py

bench-multiprocess: install   ## req/s of 1, 2 and 3 gateway processes on one PostgreSQL and Redis (docs/performance.md)
	$(BIN)/python bench/multiprocess.py

check-config: install
	$(BIN)/python proxy.py check-config config.yaml

lint: install                 ## unused imports/names, syntax
	$(BIN)/python -m pyflakes proxy.py gateway plugins tests bench

clean:
	rm -rf $(VENV) data .pytest_cache

test-container: install       ## build the image on a local Debian base, run it with podman (docs/containers.md); skips without podman
	GATEWAY_TEST_CONTAINER=1 $(BIN)/python -m pytest tests/test_container.py -v -rs -s
