# make demo : set up .venv, analyse the shipped sample runs, print the tensorboard command
# make test : set up .venv, lint, run the whole test suite
# make lint : ruff check + ruff format --check (config in pyproject.toml); make format applies both
# make dist : wheels + sdists of both packages, the C kernel's wheel repaired to manylinux (dist/)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lint format test demo bench dist clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build. BackPACK (benchmarks only) is installed
# without its dependencies because it would otherwise drag in torchvision and a newer torch.
$(STAMP): pyproject.toml setup.py trajscope/linalg/_smalleig.c plugins/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' -e ./plugins
	$(PY) -m pip install -q --no-deps backpack-for-pytorch einops unfoldnd
	touch $(STAMP)

LINT_PATHS := trajscope tests benchmarks examples plugins scripts

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

# format first (it splits `a; b` lines, which --fix cannot), then the safe fixes (import order,
# typing imports), then format again for what the fixes moved
format: $(STAMP)
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_recorder.py
	$(PY) benchmarks/bench_analysis.py

dist:
	scripts/build_wheels.sh

clean:
	rm -rf $(VENV) demo_runs .pytest_cache dist
