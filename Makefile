# Every target sets itself up from nothing: a virtual environment in .venv with the project installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: test serve install clean

$(BIN)/magi-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so the project's "torch>=2.4" is already satisfied and pulls nothing else
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/magi-server

install: $(BIN)/magi-server

test: install
	$(BIN)/python -m pytest -q

# With no weights this serves the tiny random preset (noise-like video) on http://127.0.0.1:8000
MODEL ?= tiny
serve: install
	$(BIN)/magi-server serve --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
