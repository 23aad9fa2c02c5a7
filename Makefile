# The pin resolves to the local CPU wheel; override with e.g. `make setup TORCH="torch==2.14.1"`.
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: setup demo test test-deps docs docs-deps bench lint format clean train-translate train-image \
	train-speech train-speech-loso train-image-ddp train-image-splits contender-translate contender-image contender-speech \
	gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for program in espeak-ng flite; do \
	  command -v $$program >/dev/null || missing="$$missing $$program"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing$$missing (apt-get install$$missing); the synthetic speakers and" \
	    "the speech tests that need them skip"; fi; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,apps,hf]"
	touch $(STAMP)

demo: setup
	$(PY) -m multihead.cli demo

# The recipes behind the shipped models; the contenders (benchmarks/contenders.py) run the same
# recipe with the attention built from torch.nn.
TRANSLATE_RECIPE := --minutes 54 --bf16 --threads 2 --max-tokens 2048 --lr 1e-3 --warmup 400 \
	--schedule cosine --d-model 256 --heads 4 --encoder-layers 3 --decoder-layers 3 \
	--ffn 1024 --dropout 0.1 --label-smoothing 0.1 --eval-every 1000 --valid-sentences 500 \
	--checkpoint-every 500 --average-fraction 0.15 --average-every 50 --beam 5
IMAGE_RECIPE := --minutes 5
# Speech counts updates, not minutes: the same run on a busier machine takes longer rather
# than training less (the cap is only a guard).
SPEECH_RECIPE := --steps 2664 --minutes 150

# The runs behind the shipped models. OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep
# instead of spinning, which matters when the two cores are shared.
train-translate: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train translate $(TRANSLATE_RECIPE) \
	  --run-dir runs/translate-en-fr --model-dir models/translate-en-fr --overwrite

train-image: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train image $(IMAGE_RECIPE) --overwrite

# The same recipe on two other train/test splits: each split's results.json and training log
# go to models/image-digits/splits/seed-N/ (the weights stay in runs/).
train-image-splits: setup
	for seed in 1 2; do \
	  OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train image $(IMAGE_RECIPE) --overwrite \
	    --split-seed $$seed --run-dir runs/image-digits-seed-$$seed \
	    --model-dir runs/image-digits-seed-$$seed/model || exit 1; \
	  mkdir -p models/image-digits/splits/seed-$$seed; \
	  cp runs/image-digits-seed-$$seed/model/results.json \
	    runs/image-digits-seed-$$seed/model/train_log.jsonl models/image-digits/splits/seed-$$seed/; \
	done

# The image run data-parallel in 2 processes (gloo on CPU; NCCL as well where there are GPUs):
# each takes half of every batch of 64; rank 0 writes. --standalone picks a free port.
train-image-ddp: setup
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/torchrun --standalone --nproc-per-node 2 \
	  -m multihead.cli train image --threads 1 --run-dir runs/image-digits-ddp \
	  --model-dir runs/image-digits-ddp/model --overwrite

train-speech: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train speech $(SPEECH_RECIPE) --run-dir runs/speech

# Leave-one-speaker-out: the speech recipe, each run with one more speaker held out (the
# shipped model holds out lucas). The runs go side by side, one thread each (on 2 cores that
# beats one after another with two threads). Each run's results.json and training log go to
# models/speech-digits/loso/SPEAKER/ (the weights stay in runs/); the table with the mean and
# the worst: python -m multihead.apps.speech.loso
SPEECH_LOSO_SPEAKERS := george jackson
train-speech-loso: setup
	mkdir -p runs; pids=""; for speaker in $(SPEECH_LOSO_SPEAKERS); do \
	  OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(PY) -m multihead.cli train speech $(SPEECH_RECIPE) \
	    --threads 1 --overwrite --unseen-speaker $$speaker --run-dir runs/speech-loso-$$speaker \
	    > runs/speech-loso-$$speaker.log 2>&1 & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=1; done; \
	[ $$status = 0 ] || { echo "a run failed: see runs/speech-loso-*.log"; exit 1; }
	for speaker in $(SPEECH_LOSO_SPEAKERS); do \
	  mkdir -p models/speech-digits/loso/$$speaker; \
	  cp runs/speech-loso-$$speaker/model/results.json \
	    runs/speech-loso-$$speaker/model/train_log.jsonl models/speech-digits/loso/$$speaker/; \
	done
	$(PY) -m multihead.apps.speech.loso

# Our recipes with torch.nn attention: results in benchmarks/results/contender-TASK/.
contender-translate: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/contenders.py translate $(TRANSLATE_RECIPE)

contender-image: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/contenders.py image $(IMAGE_RECIPE)

# torch's encoder layer has no relative positions: its twin adds sinusoids to the input.
contender-speech: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/contenders.py speech $(SPEECH_RECIPE) --positions sinusoidal

# Programs the tests use beyond Python: Chromium (the HTML viewer's test loads the page in a
# headless browser), espeak-ng and flite (the synthetic speakers). As root they are installed with
# apt-get; otherwise a note says what to install, and the tests that need them skip saying so.
# Only `make test` needs them: `make demo` runs without a browser.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  command -v google-chrome >/dev/null || missing="chromium"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v flite >/dev/null || missing="$$missing flite"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing for the tests: $$missing (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	    >/dev/null; } || echo "note: apt-get install $$missing failed; the tests that use it skip"; \
	else \
	  echo "note: missing $$missing; the tests that use it skip (install with:" \
	    "sudo apt-get install $$missing, or run make test as root)"; \
	fi

test: setup docs-deps test-deps
	$(PY) -m pytest

# The docs extra (mkdocs-material, mkdocstrings), installed into the venv once after setup.
# `make test` installs it too: tests/test_docs.py runs the strict build.
docs-deps: $(DOCS_STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

# HTML documentation in site/: the README's sections as guides and the API reference from the
# docstrings (mkdocs.yml). --strict: a warning (a broken link or anchor, a page missing from
# the nav, a docstring griffe cannot read) fails the build.
docs: docs-deps
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_layer.py --sizes 256 1024 2048
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_seq2seq.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_scale.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_ring.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_ddp.py

# On a machine with an NVIDIA GPU: gpu_tests/ (every kernel on cuda in fp32/bf16/fp16 against a
# float64 CPU oracle, masks, GQA, varlen, forward and backward; compat against
# nn.MultiheadAttention; KV-cache decoding; training steps; empty rows; no host sync in the
# layer's forward), then benchmarks/bench_gpu.py (→ results/gpu.json, gpu.png; also copied to
# $OUT when set). GPU_PY is used as it is when it imports torch (no setup, no network needed);
# otherwise the venv. Fails, saying so, when no CUDA device is visible.
GPU_PY ?= python3

gpu-check:
	@py="$(GPU_PY)"; \
	if ! $$py -c "import torch" >/dev/null 2>&1; then \
	  echo "gpu-check: $$py cannot import torch; using $(PY) (make setup)"; \
	  $(MAKE) setup || exit 1; py="$(PY)"; \
	fi; \
	if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "gpu-check: no nvidia-smi"; fi; \
	$$py -c "import sys, torch; ok = torch.cuda.is_available(); \
	print('gpu-check: torch', torch.__version__, '(CUDA build', torch.version.cuda, end='), '); \
	print(torch.cuda.get_device_name(0) if ok else 'no CUDA device visible'); sys.exit(0 if ok else 1)" \
	  || { echo "gpu-check: FAILED: no CUDA device is visible to $$py (torch.cuda.is_available()" \
	    "is False): run it on a machine with an NVIDIA GPU and a CUDA build of torch," \
	    "or name one with GPU_PY=/path/to/python" >&2; exit 1; }; \
	status=0; \
	PYTHONPATH=src $$py -m pytest gpu_tests -o addopts= -q -rs -p no:cacheprovider || status=1; \
	if $$py -c "import hypothesis" >/dev/null 2>&1; then \
	  PYTHONPATH=src $$py -m pytest tests/test_flex.py tests/test_compile.py -k cuda \
	    -o addopts= -q -rs -p no:cacheprovider || status=1; \
	else echo "gpu-check: hypothesis is missing, so the CUDA cases of tests/ did not run"; fi; \
	PYTHONPATH=src $$py benchmarks/bench_gpu.py || status=1; \
	if [ $$status -ne 0 ]; then echo "gpu-check: FAILED (see above)" >&2; fi; \
	exit $$status

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(VENV)/bin/ruff format --check src tests benchmarks docs

format: setup
	$(VENV)/bin/ruff format src tests benchmarks docs
	$(VENV)/bin/ruff check --fix src tests benchmarks docs

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache runs site
