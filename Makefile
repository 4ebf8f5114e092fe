# Two commands for a fresh clone: `make demo` and `make test`. Each (re)creates .venv when it is
# missing or when pyproject.toml changed since it was made (a stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp
export RADPATH_PROGRESS ?= 1

.PHONY: demo test bench bench-gpu lint clean-demo chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/radpath run pipelines/demo.yaml

# The report test opens the HTML page in headless Chromium (Debian's package), installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the report test will fail"; }

# Two workers; tests/conftest.py says what a unit of work is.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/benchmarks -p no:cacheprovider -o addopts=""

# Self-contained: generates its own synthetic tiles/volumes; writes results to $$OUT or bench-results/.
bench-gpu: $(STAMP)
	$(BIN)/python tests/benchmarks/gpu_bench.py --out $${OUT:-bench-results}

lint: $(STAMP)
	$(BIN)/ruff check radpath_fs tests

clean-demo:
	rm -rf demo
