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

# System packages that tests start for real: SLURM + munge (tests/test_slurm.py), Prometheus
# (tests/test_metrics.py), headless Chromium (tests/test_report.py). Installed when missing, as
# root on Debian/Ubuntu; elsewhere each test says what is missing and skips.
SYSTEM_PACKAGES ?= slurm-wlm munge prometheus chromium
SYSTEM_COMMANDS ?= slurmctld munged prometheus chromium

.PHONY: demo test install system-packages clean bench-store bench-mapper

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xfer demo

system-packages:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(SYSTEM_PACKAGES) (missing:$$missing; for the SLURM, Prometheus and Chromium tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "not root or no apt-get: the tests needing$$missing will be skipped"; fi; \
	fi

# The cluster tests (tests/test_cluster.py, tests/test_slurm.py: their own Ray nodes, S3
# server and SLURM daemons) run after the rest, in a pytest process of their own.
test: $(STAMP) system-packages
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not cluster" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m cluster $(PYTEST_ARGS)

bench-store: $(STAMP)
	$(PY) -m bench.store_vs_csv

bench-mapper: $(STAMP)
	$(PY) -m bench.peak_mapper_speed

clean:
	rm -rf $(VENV) demo_output xfer_store
