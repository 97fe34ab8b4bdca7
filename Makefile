# Quick start: `make run` (prune the default model) and `make test` (the test suite).
# Both create .venv and install what they need on first use (torch pinned and installed first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
ARGS    ?=
STAMP   := $(VENV)/.installed

.PHONY: install run test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py experiment=demo $(ARGS)

# two workers, one thread each (tests/conftest.py): the 2-core machine the suite is sized for; JOBS=0 runs it
# in one process
JOBS    ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(JOBS) --dist worksteal $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
