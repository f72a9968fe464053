# Set-up is part of every target: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.elbolab-installed
ARVIZ  := "arviz==1.3.*" "arviz-base==1.3.*" "arviz-stats==1.3.*" "arviz-plots==1.3.*"

.PHONY: demo test lint docs bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing later makes pip resolve a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# ArviZ 1.3 declares Python >= 3.12 but is pure Python; install its needs, then it without resolution.
	$(BIN)/python -m pip install -q "numpy>=2" "scipy>=1.13" "xarray>=2024.11" xarray-einstats lazy_loader h5netcdf h5py matplotlib
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python $(ARVIZ)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/elbolab demo --out runs/demo --seed 0 --overwrite

lint: $(STAMP)
	$(BIN)/ruff check ppl_models inference tests benchmarks docs
	$(BIN)/ruff format --check ppl_models inference tests benchmarks docs

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q

# The documentation site, offline, warnings as errors, every internal link checked.
docs: $(STAMP)
	rm -rf docs/_build docs/api
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	$(BIN)/python docs/check_links.py docs/_build/html

bench: $(STAMP)
	$(BIN)/python benchmarks/exactness.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_iwae_eval.py
	$(BIN)/python benchmarks/bench_ais.py
	$(BIN)/python benchmarks/bench_gaps.py
	$(BIN)/python benchmarks/bench_rbm.py
	$(BIN)/python benchmarks/bench_distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/api
