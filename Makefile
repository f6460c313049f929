# pushsync developer commands. Every target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint typecheck test wheel-check bench demo soak clean

# Byte-compiled on every install (only changed modules are compiled again): a wheel install compiles too, and a
# shell with PYTHONDONTWRITEBYTECODE set would otherwise compile every module at every start (~0.1 s).
install: $(STAMP)
	$(PY) -m compileall -q sync

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check sync tests bench
	$(VENV)/bin/ruff format --check sync tests bench

typecheck: install
	$(VENV)/bin/mypy

test: install
	$(PY) -m pytest -q -n auto

# Build the wheel, install it in a fresh venv, run validate/plan/run from another directory against a sandbox.
wheel-check: install
	.ci/wheel_check

demo: install
	$(VENV)/bin/pushsync demo

bench: install
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

soak: install
	$(PY) -m pytest -q -p no:cacheprovider -m soak --soak-long --timeout 3600 tests/reliability/

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
