# Two commands for a newcomer: `make train` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: install data data-mix data-vlm train train-mix study study-mix planted planted-pipeline test test-slow test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed -e '.[dev]'
	touch $(STAMP)

data: install
	$(PY) scripts/prepare_easy_vqa.py --out data/easy_vqa

# The tiny processors of configs/vlm/*_tiny.yaml (transformers MoE VLMs with STGC).
data-vlm: data
	$(PY) scripts/prepare_tiny_vlm.py

# Stages 0 -> III on easy-vqa; stage III with STGC and, beside it, the λ = 0 baseline (ARGS=--no-baseline skips it).
train: data
	$(PY) scripts/train_easy_vqa.py $(ARGS)

# The mixed pipeline: easy-vqa + Sort-of-CLEVR + its text-only family, one tokenizer for both (about 80 minutes at one thread).
data-mix: data
	$(PY) scripts/prepare_sort_of_clevr.py --out data/sort_of_clevr
	$(PY) scripts/prepare_mix.py data/easy_vqa data/sort_of_clevr --out data/mix/tokenizer

train-mix: data-mix
	$(PY) scripts/train_easy_vqa.py --pipeline mix

# The STGC study (scripts/reproduce.py; resumable run by run; hours on 2 cores, see the README's Results).
study: data
	$(PY) scripts/reproduce.py --pipeline easy_vqa --readme

# On the mix: the main comparison at the setting easy-vqa's screen chose (no screen of its own).
study-mix: data-mix
	$(PY) scripts/reproduce.py --pipeline mix --parts dense main --loss-types unlikelihood --loss-weights 0.1 --readme

# Planted conflict, the ground truth (scripts/planted.py; resumable; about 5 h on 2 cores, docs/planted.md).
planted: install
	$(PY) scripts/planted.py --parts screen map control
	$(PY) scripts/planted.py --parts map control --loss-type unlikelihood --loss-weight 1.0 --readme

# Its pipeline level: easy-vqa's stage III through `stgc fit` with a planted question family (resumable;
# about 70 min on 2 cores; results/planted/pipeline, docs/planted.md#the-pipeline-level).
planted-pipeline: install data
	$(PY) scripts/planted_pipeline.py --parts screen main --readme
	$(PY) scripts/planted_pipeline.py --parts main --loss-type unlikelihood --loss-weight 1.0 --readme

# The suite in two parts: `make test` (under 5 minutes of test time on 2 cores) and the end-to-end runs
# marked slow, which the fast part covers more briefly; `make test-all` (what CI runs) is both.
test: install
	$(PY) -m ruff check src tests scripts examples
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

test-all: test test-slow

lint: install
	$(PY) -m ruff check src tests scripts examples
	$(PY) -m ruff format --check src tests scripts examples

bench: install
	$(PY) scripts/bench_moe.py

clean:
	rm -rf logs/easy_vqa logs/mix data
