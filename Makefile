SHELL := /bin/bash
# `make run` and `make test` do their whole set-up on a fresh Debian/Ubuntu machine.
# Re-running is fast: each step leaves a stamp in .stamps/ and reruns only when its inputs change.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEEPSPEED_SPEC ?= deepspeed==0.19.8
RUN_SIZE    ?= 256MiB
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip -q --disable-pip-version-check
STAMPS      := .stamps
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: run test build setup aio-op lint bench-tiny clean

run: aio-op
	@dir=$$(mktemp -d "$(CURDIR)/.run.XXXXXX"); trap 'rm -rf "$$dir"' EXIT; \
	$(VENV)/bin/infinity info --dir "$$dir" && \
	$(VENV)/bin/infinity bench io --dir "$$dir" --size $(RUN_SIZE) --quick

test: aio-op
	$(PY) -m pytest -q

setup: $(STAMPS)/deps
build: $(STAMPS)/build

$(STAMPS)/system: tools/bootstrap-system.sh
	PYTHON=$(PYTHON) bash tools/bootstrap-system.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: $(STAMPS)/system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@touch $@

# torch first (pinned, so that nothing pulls a different build), then DeepSpeed against it
$(STAMPS)/deps: $(STAMPS)/venv Makefile
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install numpy psutil "click>=8" "rich>=13" "xxhash>=3" "pybind11>=2.12" ninja setuptools wheel \
	    "hypothesis>=6" "pytest>=8" ruff
	$(PIP) install --no-build-isolation "$(DEEPSPEED_SPEC)"
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

# DeepSpeed JIT-compiles its aio op on first use (minutes on 2 cores); do it once, up front.
aio-op: $(STAMPS)/build
	@$(PY) -c "import infinity.io._deepspeed as d; d.load_aio()" 2>&1 | grep -v 'Setting accelerator' ; \
	  exit $${PIPESTATUS[0]}

lint: $(STAMPS)/deps
	$(VENV)/bin/ruff check infinity tests bench
	$(VENV)/bin/ruff format --check infinity tests bench

# every benchmark at a tiny size, so none of them rots
bench-tiny: aio-op
	@dir=$$(mktemp -d "$(CURDIR)/.run.XXXXXX"); trap 'rm -rf "$$dir"' EXIT; \
	$(PY) bench/io.py --dir "$$dir" --size 8MiB --quick --json "$$dir/io.json" && \
	$(PY) bench/store.py --dir "$$dir" --tensors 4 --tensor-size 1MiB --repeats 1 --json "$$dir/store.json"

clean:
	rm -rf build $(STAMPS) infinity/_C*.so *.egg-info
