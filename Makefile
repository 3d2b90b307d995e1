# diffalign: two entry points, both create the virtual environment they need.
#   make demo   align the embedded toy pipeline (writes runs/demo/report.html)
#   make test   the test suite (fast tests; `make test-slow` for the long ones)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch (on this machine's disk); a bare `torch` requirement would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and no root: browser tests will be skipped (outside CI)"; fi; }

demo: $(STAMP)
	$(BIN)/diffalign demo --config configs/demo.toml

test: $(STAMP) browser
	$(BIN)/pytest -m "not slow" -q

test-slow: $(STAMP) browser
	$(BIN)/pytest -m slow -q || [ $$? = 5 ]  # 5: no slow test collected

test-all: $(STAMP) browser
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
