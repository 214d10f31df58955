# Common flows. Variables: PY (python that creates the venv), VENV, DATA (corpus), RUN (run dir),
# DEVICE (auto, cpu, cuda, cuda:1 ...), PRESET (tiny or paper). The demos keep their data inside
# their run directory (DEMO = RUN/data), so runs in other clones or with another RUN never collide
# and nothing outside RUN is deleted.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
DEMO ?= $(RUN)/data
DATA ?= $(DEMO)/corpus
DEVICE ?= auto
PRESET ?= tiny
FACE ?= haar

STORE ?= $(DEMO)/tokens.zarr
WORKERS ?= 2

.PHONY: install test test-slow demo demo-steps synth speech-deps speech-corpus speech-demo speech-demo-steps seeds ingest tokenize inspect pretrain finetune predict results bench-ingest bench-tokenize clean

TORCH_INDEX ?=

install:  ## virtualenv + package + test deps (no system packages needed: wheels bundle FFmpeg); TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only torch
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install torch --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/vqmae --help > /dev/null

test:  ## default suite (CPU, a few minutes on two cores)
	$(BIN)/python -m pytest -q

test-slow:  ## the long tests excluded from `make test`
	$(BIN)/python -m pytest -q -m slow

synth:
	$(BIN)/vqmae synth $(DATA) --preset $(PRESET) --force

SPEECH_RUN ?= runs/speech
SPEECH_DATA ?= $(SPEECH_RUN)/data
SPEECH ?= $(SPEECH_DATA)/speech
SPEECH_PACKAGES := festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts

speech-deps:  ## what the speech corpus needs: festival and three voices (Debian packages), praat-parselmouth
	@command -v text2wave > /dev/null || { echo "installing $(SPEECH_PACKAGES) (apt-get)"; \
		apt-get install -y -q $(SPEECH_PACKAGES) > /dev/null || sudo apt-get install -y -q $(SPEECH_PACKAGES); }
	$(BIN)/python -m pip install -q -e '.[speech]'

speech-corpus: speech-deps  ## the second evaluation corpus (festival voices acting emotion through prosody, noisy twins at 10 / 0 dB) into SPEECH
	$(BIN)/vqmae synth $(SPEECH) --kind speech --workers $(WORKERS) --force

SPEECH_STORE ?= $(SPEECH_DATA)/speech.zarr

speech-demo:  ## the pipeline on the speech corpus: tokenize (audio only) → pretrain → finetune (5 speaker folds, 10% and 100% of the labels, both baselines) → the fold models scored on the noisy twins
	$(call locked,$(SPEECH_RUN),speech-demo-steps,speech-demo,SPEECH_RUN)

speech-demo-steps: speech-corpus
	rm -rf $(SPEECH_STORE) $(SPEECH_STORE).parts $(SPEECH_DATA)/speech_snr*.zarr $(SPEECH_DATA)/speech_snr*.zarr.parts \
		$(SPEECH_RUN)/tokenize $(SPEECH_RUN)/tokenize_snr* $(SPEECH_RUN)/pretrain $(SPEECH_RUN)/finetune
	$(BIN)/vqmae tokenize $(SPEECH) --out $(SPEECH_STORE) --preset $(PRESET) --workers $(WORKERS) \
		--device $(DEVICE) --run-dir $(SPEECH_RUN)/tokenize
	$(BIN)/vqmae pretrain $(SPEECH_STORE) --preset $(PRESET) --device $(DEVICE) --run-dir $(SPEECH_RUN)/pretrain
	$(BIN)/vqmae finetune $(SPEECH_STORE) --mae $(SPEECH_RUN)/pretrain/mae.pt --preset $(PRESET) --device $(DEVICE) \
		--folds 5 --label-fraction 0.1,1 --run $(SPEECH_RUN)/finetune
	for snr in 10 0; do \
		$(BIN)/vqmae tokenize $(SPEECH)_snr$$snr --out $(SPEECH_DATA)/speech_snr$$snr.zarr --tokenizers $(SPEECH_RUN)/tokenize/tokenizers \
			--preset $(PRESET) --workers $(WORKERS) --device $(DEVICE) --run-dir $(SPEECH_RUN)/tokenize_snr$$snr && \
		$(BIN)/vqmae evaluate $(SPEECH_RUN)/finetune $(SPEECH_DATA)/speech_snr$$snr.zarr --device $(DEVICE) || exit 1; \
	done

seeds:  ## after make demo and make speech-demo: both stores pretrained and fine-tuned under seeds 0, 1, 2, tabulated across seeds (about 50 min on 2 CPU cores)
	$(BIN)/python benchmarks/seeds.py $(STORE) --run $(RUN)-seeds --seeds 0,1,2 --folds 4 --label-fraction 0.25,1 --device $(DEVICE)
	$(BIN)/python benchmarks/seeds.py $(SPEECH_STORE) --run $(SPEECH_RUN)-seeds --seeds 0,1,2 --folds 5 --label-fraction 0.1,1 --device $(DEVICE)

ingest:  ## decode + crop every clip, list failures (a dry run of tokenize's decoding)
	$(BIN)/vqmae ingest $(DATA) --face $(FACE) --preset $(PRESET) --workers $(WORKERS) --run-dir $(RUN)/ingest

tokenize:  ## stage 1: train both tokenizers on DATA and encode it into STORE
	$(BIN)/vqmae tokenize $(DATA) --out $(STORE) --face $(FACE) --preset $(PRESET) \
		--workers $(WORKERS) --device $(DEVICE) --run-dir $(RUN)/tokenize

inspect:
	$(BIN)/vqmae inspect $(STORE)

pretrain:  ## stage 2 on STORE (tiny preset: ~4 min on two CPU cores)
	$(BIN)/vqmae pretrain $(STORE) --preset $(PRESET) --device $(DEVICE) --run-dir $(RUN)/pretrain

FRACTIONS ?= 0.25,1

finetune:  ## stage 3 on STORE: 4 speaker folds, pretrained vs from scratch vs the bag-of-tokens and eGeMAPS baselines, label fractions FRACTIONS
	$(BIN)/vqmae finetune $(STORE) --mae $(RUN)/pretrain/mae.pt --preset $(PRESET) --device $(DEVICE) \
		--label-fraction $(FRACTIONS) --run $(RUN)/finetune

predict:  ## fold 0's held-out speaker, scored by the fold-0 model (pretrained, probe or scratch) that did best on its validation speakers
	@test -f $(RUN)/finetune/folds.json || { echo "no $(RUN)/finetune/folds.json: run make finetune first"; exit 2; }
	@SPK=$$($(BIN)/python -c "import json; print(json.load(open('$(RUN)/finetune/folds.json'))[0]['test_speakers'][0])"); \
	MODEL=$$($(BIN)/python -c "import json, pathlib; \
	fold = json.load(open('$(RUN)/finetune/folds.json'))[0]['name']; \
	units = [pathlib.Path('$(RUN)/finetune/units', v, 'frac1', fold, 'result.json') for v in ('pretrained', 'probe', 'scratch')]; \
	best = max(units, key=lambda p: (json.load(open(p))['val'], p.parts[-4] == 'pretrained')); \
	print(best.parent / 'classifier.pt')"); \
	echo "held-out speaker $$SPK (true labels: $(DATA)/manifest.csv); model $$MODEL (best on the validation speakers)"; \
	$(BIN)/vqmae predict $(DATA)/video/$$SPK $(DATA)/audio/$$SPK --same-speaker --device $(DEVICE) \
		--model $$MODEL --csv $(RUN)/predict.csv

# A demo holds a lock on its run directory while it runs: a second one with the same directory
# stops at once (exit 75) instead of deleting the first one's files. Side by side: another RUN.
define locked
	@mkdir -p $(1); flock -n -E 75 $(1)/.lock $(MAKE) --no-print-directory $(2); rc=$$?; if [ $$rc = 75 ]; then \
		echo "make $(3): $(1) is in use by another run; give this one its own directory, e.g. $(4)=$(1)-2" >&2; fi; exit $$rc
endef

demo:  ## synth → tokenize → store summary → pretrain → finetune → predict → results (tiny preset, two CPU cores)
	$(call locked,$(RUN),demo-steps,demo,RUN)

demo-steps:
	rm -rf $(STORE) $(STORE).parts $(RUN)/tokenize $(RUN)/pretrain $(RUN)/finetune
	$(MAKE) synth tokenize inspect pretrain finetune predict results

results:  ## the demo's fine-tuning table and where every plot is
	@echo; echo "== results ($(RUN)/finetune/report.md)"; sed -n '/^| variant/,$$p' $(RUN)/finetune/report.md
	@echo; echo "== plots"
	@ls -1 $(RUN)/tokenize/tokenizers/*.png $(RUN)/pretrain/recon/*.png $(RUN)/finetune/*.png 2>/dev/null || true
	@echo "per-clip predictions: $(RUN)/predict.csv; models: $(RUN)/finetune/units/*/frac1/*/classifier.pt"
	@$(BIN)/python -c "import csv, os; \
	truth = {os.path.realpath(os.path.join('$(DATA)', r['path'])): r['label'] for r in csv.DictReader(open('$(DATA)/manifest.csv'))}; \
	every = [r for r in csv.DictReader(open('$(RUN)/predict.csv')) if not r['start']]; \
	rows = [r for r in every if r['status'] == 'ok']; \
	hit = sum(truth.get(os.path.realpath(r['path'])) == r['top'] for r in rows); \
	print(f'vqmae predict on the held-out speaker: {hit} of {len(rows)} clips labelled correctly (chance 1 in {len(set(truth.values()))}); {len(every) - len(rows)} failed')"

bench-ingest:
	$(BIN)/python benchmarks/ingest.py --data $(DATA)

bench-tokenize:
	$(BIN)/python benchmarks/tokenize_stages.py --data $(DATA) --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))

clean:
	rm -rf $(VENV) build *.egg-info
