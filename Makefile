# fluxc: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FLUXC  := $(VENV)/bin/fluxc
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
STAMP  := $(VENV)/.fluxc-installed

.PHONY: setup venv toolchain browser demo test clean help

help:
	@echo "make demo   - set up, then run the whole chain on the built-in tiny FLUX model"
	@echo "make test   - set up, then run the test suite"
	@echo "make setup  - create .venv, install torch, fluxc and the isolated TPU-MLIR toolchain"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes (the stamp records its hash).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,cluster]" "$(TORCH_SPEC)"
	sha256sum pyproject.toml > $(STAMP)

venv: $(STAMP)

toolchain: venv
	$(FLUXC) toolchain install

# Debian's chromium and its driver, for the browser test of `fluxc serve`'s page (tests/test_serve.py
# drives it through selenium at /usr/bin/chromedriver: no browser download). No apt: a loud failure.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	else echo "make setup: needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver) for the browser test; no apt-get here" >&2; exit 1; fi

setup: toolchain browser

demo: setup
	bash scripts/demo.sh "$(DEMO_DIR)"

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
