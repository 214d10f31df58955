# Common flows. Variables: PY (python used to create the venv), VENV, DATA, RUN, DEVICE.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= /tmp/vqmae-demo
DATA ?= $(DEMO)/corpus
RUN ?= runs/demo
DEVICE ?= auto

.PHONY: install test test-slow demo bench-ingest clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/vqmae --help > /dev/null

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
