# `make demo` and `make test` each create (or reuse) .venv and install what they need first.
PYTHON ?= python3
comma  := ,
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp changes with pyproject.toml, so a dependency change reinstalls.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# A GPU host keeps its own CUDA PyTorch (and ONNX Runtime, TensorRT): the venv sees the system's packages, and
# neither the CPU wheel nor the `cpu` extra is installed.
GPU_HOST := $(shell $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && echo yes)

.PHONY: demo test env clean gpu-check

env: $(STAMP)

# lmms-eval goes in without its own dependency list, whose torchvision pin would replace torch (pyproject.toml:
# the eval extra lists what it needs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(if $(GPU_HOST),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(GPU_HOST),,$(BIN)/python -m pip install --quiet torch==2.13.0)
	$(BIN)/python -m pip install --quiet -e '.[dev,serve,eval$(if $(GPU_HOST),,$(comma)cpu)]'
	$(BIN)/python -m pip install --quiet --no-deps 'lmms-eval>=0.7.3,<0.8'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/visprune pipeline --model tiny-vqa --method divprune --reduction 0.6 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# On a GPU host, with the host's own python3 and packages, no install step (works offline): bench/gpu_check.py.
# The quick path fits in a few minutes; FULL=1 adds ONNX exports, engine folders, the 7B benchmark, pytest -m gpu.
gpu-check:
	PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON) bench/gpu_check.py $(if $(FULL),--full) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs
