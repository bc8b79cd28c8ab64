# `make demo` and `make test` each create (or reuse) .venv and install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp changes with pyproject.toml, so a dependency change reinstalls.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0   # the CPU wheel on our machines; see README for GPU hosts
	$(BIN)/python -m pip install --quiet -e '.[dev,cpu]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/visprune calibrate --model tiny --reduction 0.6 --out runs/demo/recipe.json
	$(BIN)/visprune export --model tiny --recipe runs/demo/recipe.json --out runs/demo/onnx
	$(BIN)/visprune build --onnx runs/demo/onnx --out runs/demo/engine
	$(BIN)/python -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.chelsea()).save('runs/demo/cat.png')"
	$(BIN)/visprune run --engine runs/demo/engine --image runs/demo/cat.png --prompt "What animal is this?" --max-new-tokens 16
	$(BIN)/visprune report --engine runs/demo/engine --model tiny --out runs/demo/report

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
