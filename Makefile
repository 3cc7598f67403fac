# Every target sets itself up from nothing: a virtual environment in .venv with the project installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch for the CPU path (make install / test / serve, and CI)
TORCH_VERSION ?= 2.13.0
# torch for NVIDIA GPUs (make install-gpu): the same pin as Dockerfile.cuda's TORCH_VERSION / TORCH_INDEX (CUDA 13
# wheels); tests/test_dockerfile.py fails when the two disagree or fall below what the attention code needs
GPU_TORCH_VERSION ?= 2.11.0
GPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cu130

.PHONY: test serve install install-gpu bench-gpu clean

$(BIN)/magi-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so the project's "torch>=2.4" is already satisfied and pulls nothing else
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/magi-server

install: $(BIN)/magi-server

# the same .venv with the CUDA torch instead; make test / serve then use it
install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(GPU_TORCH_VERSION)" --index-url $(GPU_TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[cuda,test]"
	touch $(BIN)/magi-server

test: install
	$(BIN)/python -m pytest -q

# on a GPU machine after make install-gpu (see benchmarks/README.md); results go to $$OUT or ./bench-out
bench-gpu:
	$(BIN)/python benchmarks/gpu_bench.py

# With no weights this serves the tiny random preset (noise-like video) on http://127.0.0.1:8000
MODEL ?= tiny
serve: install
	$(BIN)/magi-server serve --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
