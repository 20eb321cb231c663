# Set-up and entry points. Every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo_magvit

.PHONY: demo test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Train the tiny tokenizer on the embedded Atari clips; run again to resume or re-evaluate.
demo: $(STAMP)
	$(BIN)/python -m launch.train --config=configs/magvit.py:tiny --workdir=$(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15 tests

clean-demo:
	rm -rf $(DEMO_DIR)
