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
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: run test test-asan build setup aio-op lint bench-tiny clean

run: aio-op
	@dir=$$(mktemp -d "$(CURDIR)/.run.XXXXXX"); trap 'rm -rf "$$dir"' EXIT; \
	$(VENV)/bin/infinity info --dir "$$dir" && \
	$(PY) -m infinity.inference.demo --dir "$$dir"

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
	$(PIP) install numpy psutil "click>=8" "rich>=13" "xxhash>=3" "transformers>=4.45" "safetensors>=0.4" "accelerate>=0.30" "pybind11>=2.12" ninja setuptools wheel \
	    "hypothesis>=6" "pytest>=8" ruff
	$(PIP) install --no-build-isolation "$(DEEPSPEED_SPEC)"
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

# DeepSpeed JIT-compiles its aio op on first use (minutes on 2 cores); do it once, up front.
# It is kept where torch keeps the ops it compiles, as outside make: TORCH_EXTENSIONS_DIR if set,
# else ~/.cache/torch_extensions/pyXY_BUILD. The load says when it compiles, then a line every 30 s.
aio-op: $(STAMPS)/build
	@$(PY) -c "from infinity.io import load_aio; load_aio()" 2>&1 \
	  | grep --line-buffered -v 'Setting accelerator' ; exit $${PIPESTATUS[0]}

# The C++ core built with AddressSanitizer + UBSan (into .asan/, next to a copy of the package)
# and its tests run against it; python itself is not instrumented, so libasan is preloaded.
test-asan: $(STAMPS)/deps
	rm -rf .asan && mkdir -p .asan && cp -r infinity .asan/ && rm -f .asan/infinity/_C*.so
	INFINITY_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib .asan --build-temp .asan/tmp
	cd .asan && ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ../$(PY) -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir .. \
	  ../tests/test_arena.py ../tests/test_schedule.py

lint: $(STAMPS)/deps
	$(VENV)/bin/ruff check infinity tests bench
	$(VENV)/bin/ruff format --check infinity tests bench

# bench/'s own dependency (pyproject's `bench` extra): matplotlib, for the plots
$(STAMPS)/bench: $(STAMPS)/deps
	$(PIP) install "matplotlib>=3.5"
	@touch $@

# every benchmark at a tiny size, so none of them rots
bench-tiny: aio-op $(STAMPS)/bench
	@dir=$$(mktemp -d "$(CURDIR)/.run.XXXXXX"); trap 'rm -rf "$$dir"' EXIT; \
	$(PY) bench/io.py --dir "$$dir" --size 8MiB --quick --json "$$dir/io.json" && \
	$(PY) bench/store.py --dir "$$dir" --tensors 4 --tensor-size 1MiB --repeats 1 --json "$$dir/store.json" && \
	$(PY) bench/schedule.py --passes 5 --json "$$dir/schedule.json" && \
	$(PY) bench/forward.py --tiny --systems synth,airllm,infinity --infinity-dtypes bf16,fp8 \
	  --dir "$$dir/forward" --json "$$dir/forward.json" && \
	$(PY) bench/train.py --tiny --systems bounds,ours --curve 0.5 --steps 2 \
	  --dir "$$dir/train" --json "$$dir/train.json"

clean:
	rm -rf build .asan $(STAMPS) infinity/_C*.so *.egg-info
