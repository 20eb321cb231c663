# Set-up and entry points. Every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/compare_tiny
TOKENIZER_DEMO_DIR ?= runs/demo_magvit

.PHONY: demo demo-tokenizer test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The tiny comparison on the embedded Atari clips: tokenizer, token cache, MaskGIT, WALT, report.
# Rerunning reuses finished stages.
demo: $(STAMP)
	$(BIN)/python -m launch.compare --config=configs/compare.py:tiny --workdir=$(DEMO_DIR)

# Only the tiny tokenizer, with its reconstruction GIFs and PSNR/SSIM before and after training.
demo-tokenizer: $(STAMP)
	$(BIN)/python -m launch.train --config=configs/magvit.py:tiny --workdir=$(TOKENIZER_DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean-demo:
	rm -rf $(DEMO_DIR) $(TOKENIZER_DEMO_DIR)
