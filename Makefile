# The pin resolves to the local CPU wheel; override with e.g. `make setup TORCH="torch==2.14.1"`.
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint format clean train-translate train-image train-speech \
	train-image-ddp

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v espeak-ng >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "note: espeak-ng is missing (apt-get install espeak-ng); speech tests that need it skip"; fi; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,apps,hf]"
	touch $(STAMP)

demo: setup
	$(PY) -m multihead.cli demo

# The runs behind the shipped models. OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep
# instead of spinning, which matters when the two cores are shared.
train-translate: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train translate \
	  --minutes 54 --bf16 --threads 2 --max-tokens 2048 --lr 1e-3 --warmup 400 \
	  --schedule cosine --d-model 256 --heads 4 --encoder-layers 3 --decoder-layers 3 \
	  --ffn 1024 --dropout 0.1 --label-smoothing 0.1 --eval-every 1000 \
	  --valid-sentences 500 --checkpoint-every 500 --average-fraction 0.15 \
	  --average-every 50 --beam 5 --run-dir runs/translate-en-fr \
	  --model-dir models/translate-en-fr --overwrite

train-image: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train image

# The image run data-parallel in 2 processes (gloo on CPU; NCCL as well where there are GPUs):
# each takes half of every batch of 64; rank 0 writes. --standalone picks a free port.
train-image-ddp: setup
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/torchrun --standalone --nproc-per-node 2 \
	  -m multihead.cli train image --threads 1 --run-dir runs/image-digits-ddp \
	  --model-dir runs/image-digits-ddp/model --overwrite

train-speech: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m multihead.cli train speech --minutes 20 --run-dir runs/speech

test: setup
	$(PY) -m pytest

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_layer.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_seq2seq.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_scale.py
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_ring.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache runs
