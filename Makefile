# Two entry points: `make demo` and `make test`. Both set up everything first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP_SYS := .setup-system.stamp
STAMP_VENV := $(VENV)/.installed

.PHONY: setup demo test lint typecheck pytest clean

setup: $(STAMP_SYS) $(STAMP_VENV)

$(STAMP_SYS): tools/setup-system.sh
	@bash tools/setup-system.sh
	@touch $@

$(STAMP_VENV): pyproject.toml $(STAMP_SYS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: setup
	$(VENV)/bin/gemfs demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest -q -m "not slow"

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(STAMP_SYS) build *.egg-info
