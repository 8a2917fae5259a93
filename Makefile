# Two entry points: `make demo` and `make test`. Both set up everything first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev fio \
	qemu-system-x86 linux-image-amd64 busybox-static
STAMP_SYS := .setup-system.stamp
STAMP_VENV := $(VENV)/.installed

.PHONY: setup demo test lint typecheck pytest clean

setup: $(STAMP_SYS) $(STAMP_VENV)

$(STAMP_SYS):
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
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
