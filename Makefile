# Two commands for a fresh clone: `make demo` and `make test`. Each (re)creates .venv when it is
# missing or when pyproject.toml changed since it was made (a stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp
export RADPATH_PROGRESS ?= 1

.PHONY: demo test bench bench-gpu lint clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/radpath run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/benchmarks -p no:cacheprovider -o addopts=""

# Self-contained: generates its own synthetic tiles/volumes; writes results to $$OUT or bench-results/.
bench-gpu: $(STAMP)
	$(BIN)/python tests/benchmarks/gpu_bench.py --out $${OUT:-bench-results}

lint: $(STAMP)
	$(BIN)/ruff check radpath_fs tests

clean-demo:
	rm -rf demo
