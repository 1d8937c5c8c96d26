# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if absent, install pinned dependencies, run the demo
#   make test   - same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without an NVIDIA GPU, take the CPU build of torch (PyPI's default Linux
# wheel is the multi-GB CUDA build). Override TORCH_PIP_ARGS to choose yourself.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_PIP_ARGS ?= --extra-index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 10
else
TORCH_PIP_ARGS ?=
endif
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install clean bench-store bench-mapper

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xfer demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

bench-store: $(STAMP)
	$(PY) bench/bench_store.py

bench-mapper: $(STAMP)
	$(PY) bench/bench_mapper.py

clean:
	rm -rf $(VENV) demo_output xfer_store
