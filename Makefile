# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_ORACLES := qemu-utils qemu-system-x86 nbdkit libnbd-bin python3-libnbd fio openssl
RUN_DIR := run

.PHONY: run test venv oracles lint typecheck pytest clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Install the Debian oracles only when one is missing, so a developer's machine is left alone.
oracles:
	@missing=""; \
	for p in $(DEBIAN_ORACLES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian oracles:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: venv
	$(VENV)/bin/ruff check src tests bench

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv oracles
	$(VENV)/bin/pytest -n 2 tests

test: venv oracles lint typecheck pytest

# The main job: a qemu-system-compatible block front end on a default qcow2 image with a backing
# file, HMP on stdio (type `info block`, `help`, `quit`).
run: venv
	@mkdir -p $(RUN_DIR)
	@[ -f $(RUN_DIR)/base.qcow2 ] || $(VENV)/bin/blockgraph img create -f qcow2 $(RUN_DIR)/base.qcow2 1G
	@[ -f $(RUN_DIR)/disk.qcow2 ] || $(VENV)/bin/blockgraph img create -f qcow2 -b base.qcow2 -F qcow2 $(RUN_DIR)/disk.qcow2
	$(VENV)/bin/blockgraph system -nodefaults -display none -machine none \
	  -drive if=none,id=disk0,file=$(RUN_DIR)/disk.qcow2,cache=writethrough,node-name=disk \
	  -monitor stdio

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache
