# hero_compute: `make run` starts an explorer and a node on the default Unix sockets;
# `make test` runs every test.  Both set up what they need on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Run from the source tree: twistd finds our plugins in ./twisted/plugins through
# PYTHONPATH (an editable install of a flat layout would hide them).
export PYTHONPATH := $(CURDIR)
DEBIAN_PACKAGES := python3-venv qemu-system-x86 qemu-utils iproute2 socat curl wrk prometheus chromium chromium-driver openssh-client kmod debootstrap postgresql

.PHONY: install system-deps run test lint format bench smoke clean install-systemd xterm

# The .pth puts this clone on the venv's path, so `.venv/bin/twistd -n explorer` finds
# ./twisted/plugins without PYTHONPATH; .venv/bin/hero-compute is the CLI of the clone.
$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hero_compute_source.pth"
	printf '#!/bin/sh\nexec "%s" -P -m hero_compute.cli "$$@"\n' "$(abspath $(PY))" > $(VENV)/bin/hero-compute
	chmod +x $(VENV)/bin/hero-compute
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

# As root: a venv in /opt/hero_compute with hero_compute installed (a wheel, not this
# clone), the units, the hero user (sysusers.d) and /run/hero_compute (tmpfiles.d).
# `make -n install-systemd` shows what it would do; DESTDIR=/tmp/x stages it instead
# (then nothing is created or reloaded on this machine).
OPT ?= /opt/hero_compute
UNIT_DIR ?= /etc/systemd/system
install-systemd:
	$(PYTHON) -m venv $(DESTDIR)$(OPT)
	$(DESTDIR)$(OPT)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(OPT)/bin/pip install -q .
	install -d $(DESTDIR)$(UNIT_DIR) $(DESTDIR)/etc/sysusers.d $(DESTDIR)/etc/tmpfiles.d
	install -m 0644 contrib/systemd/*.service contrib/systemd/*.socket $(DESTDIR)$(UNIT_DIR)/
	install -m 0644 contrib/systemd/hero-compute.sysusers.conf $(DESTDIR)/etc/sysusers.d/hero-compute.conf
	install -m 0644 contrib/systemd/hero-compute.tmpfiles.conf $(DESTDIR)/etc/tmpfiles.d/hero-compute.conf
	if [ -z "$(DESTDIR)" ]; then \
	  systemd-sysusers hero-compute.conf && \
	  systemd-tmpfiles --create hero-compute.conf && \
	  systemctl daemon-reload; \
	fi
	@echo "next: systemctl enable --now hero-compute-explorer.socket hero-compute-explorer.service hero-compute-node.service"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

# The dashboard's terminal (xterm.js and its fit add-on), copied from npm at the versions
# pinned in hero_compute/explorer/ui_assets.py: the only step, a copy.
XTERM_VERSION = 6.0.0
XTERM_FIT_VERSION = 0.11.0
xterm:
	tmp=$$(mktemp -d) && cd $$tmp && \
	npm pack --silent @xterm/xterm@$(XTERM_VERSION) @xterm/addon-fit@$(XTERM_FIT_VERSION) && \
	mkdir x f && tar xzf xterm-xterm-$(XTERM_VERSION).tgz -C x && \
	tar xzf xterm-addon-fit-$(XTERM_FIT_VERSION).tgz -C f && \
	dest=$(CURDIR)/hero_compute/explorer/ui/static && \
	cp x/package/lib/xterm.js x/package/css/xterm.css $$dest/ && \
	cp x/package/LICENSE $$dest/xterm-LICENSE.txt && \
	cp f/package/lib/addon-fit.js $$dest/xterm-addon-fit.js && \
	cp f/package/LICENSE $$dest/xterm-addon-fit-LICENSE.txt && \
	rm -rf $$tmp
