# The two commands of the README: `make serve` runs the service, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export INVERSION_MODEL_CACHE_DIR ?= $(CURDIR)/.cache/models

.PHONY: install serve demo test lint bench screenshot

$(BIN)/ddim-invert: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build 2.13.0 on disk, never a CUDA download.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[gateway,worker,dev,client]"
	touch $@

install: $(BIN)/ddim-invert

# Invert the shipped sample photograph in-process with the offline tiny model.
demo: install
	$(BIN)/ddim-invert local samples/chelsea.png --prompt "a photo of a cat" --steps 50 --out out/chelsea.safetensors

serve: install
	$(BIN)/python scripts/serve.py

test: install
	$(BIN)/python scripts/ensure_redis.py
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy .

# docs/page.png: the page after a finished job, taken by the browser test (needs chromium).
screenshot: install
	BROWSER_SCREENSHOT=docs/page.png $(BIN)/python -m pytest -q tests/browser -k drop_submit
