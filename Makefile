# boneaug: `make demo` runs the main job on the embedded default; `make test` runs the tests.
# Both create .venv from the local package mirror on first use (1.5-3 minutes); the test tools
# (pytest, moto, ...) come with the first `make test`, not with `make demo`.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEV     := $(VENV)/.installed-dev
WORK    ?= work
PROFILE ?= local
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: demo test test-fast bench load-serve install clean reproduce device-wheels

PIP     := $(BIN)/pip install --quiet --constraint constraints.txt

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP) -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(PIP) -e ".[dev]"
	touch $(DEV)

install: $(DEV)

demo: $(STAMP)
	$(BIN)/python jobs/augment_tibia.py --profile $(PROFILE) --data $(WORK) --synthetic

# the paper's tables with the copy-paste and oracle arms, the learning curve and SEEDS seeds
SEEDS   ?= 0,1,2
reproduce: $(STAMP)
	$(BIN)/python jobs/reproduce.py --profile $(PROFILE) --data $(WORK) --synthetic --seeds $(SEEDS)

# the Serve page test drives Debian's headless Chromium (a system package, no browser download)
test: $(DEV)
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt) for the page test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	  chromium >/dev/null; } || { echo "could not install chromium: as root, run" \
	  "'apt-get install chromium', then make test again"; exit 1; }
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the edit loop: everything but the tests marked slow (end-to-end jobs, trainings, sweeps, the
# service, the browser); make test stays the whole suite and what CI runs
test-fast: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# what benchmarks/device_check.sh needs beside torch on a GPU image (Python 3.12), to carry there
device-wheels: $(STAMP)
	$(BIN)/pip download --quiet --dest .device_wheels --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  "pydantic==$$($(BIN)/python -c 'import pydantic; print(pydantic.VERSION)')"

bench: $(DEV)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# a 60 s locust load on the service with a model switch in the middle (the `load` extra)
load-serve: $(DEV)
	$(PIP) -e ".[load]"
	$(BIN)/python benchmarks/load_serve.py

clean:
	rm -rf $(WORK) mlflow.db mlruns .pytest_cache
