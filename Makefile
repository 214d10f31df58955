# Common flows. Variables: PY (python that creates the venv), VENV, DATA (corpus), RUN (run dir),
# DEVICE (auto, cpu, cuda, cuda:1 ...), PRESET (tiny or paper).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= /tmp/vqmae-demo
DATA ?= $(DEMO)/corpus
RUN ?= runs/demo
DEVICE ?= auto
PRESET ?= tiny
FACE ?= haar

.PHONY: install test test-slow demo synth ingest bench-ingest clean

install:  ## virtualenv + package + test deps (no system packages needed: wheels bundle FFmpeg)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/vqmae --help > /dev/null

test:  ## default suite (CPU, a few minutes on two cores)
	$(BIN)/python -m pytest -q

test-slow:  ## the long tests excluded from `make test`
	$(BIN)/python -m pytest -q -m slow

synth:
	$(BIN)/vqmae synth $(DATA) --preset $(PRESET) --force

ingest:
	$(BIN)/vqmae ingest $(DATA) --face $(FACE) --preset $(PRESET) --run-dir $(RUN)/ingest

demo: synth ingest  ## demo corpus → decode + face crops (later stages join as they land)

bench-ingest:
	$(BIN)/python benchmarks/ingest.py --data $(DATA)

clean:
	rm -rf $(VENV) build *.egg-info
