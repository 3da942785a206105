# hero_compute: `make run` starts an explorer and a node on the default Unix sockets;
# `make test` runs every test.  Both set up what they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Run from the source tree: twistd finds our plugins in ./twisted/plugins through
# PYTHONPATH (an editable install of a flat layout would hide them).
export PYTHONPATH := $(CURDIR)
DEBIAN_PACKAGES := python3-venv qemu-system-x86 qemu-utils iproute2 socat curl wrk prometheus

.PHONY: install system-deps run test lint format bench smoke clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: system-deps $(VENV)/.installed

# Debian packages for QEMU VMs, network-namespace tests and benchmarks; installed only
# when missing, and only where we may (root).
system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; \
	  fi; \
	fi

run: install
	@echo "explorer: $${HERO_SOCKET_DIR:-$$HOME/hero/var/sockets}/hero_compute_explorer.sock"
	@$(VENV)/bin/twistd -n --pidfile= explorer & explorer=$$!; \
	trap 'kill $$explorer 2>/dev/null; wait $$explorer' EXIT INT TERM; \
	sleep 1; $(VENV)/bin/twistd -n --pidfile= node

# FAST=1 skips the slow tests (the wheel build); CI runs everything.
test: install
	$(VENV)/bin/pytest $(if $(FAST),-m "not slow") $(PYTEST_ARGS)

# What CI checks before the tests: style, types, and the dependency rules.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Apply the formatter and the safe fixes.
format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# Build the wheel, install it in a fresh venv, and show both twistd commands.
smoke: install
	$(VENV)/bin/pytest tests/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
