# Two commands set up everything on a fresh machine:  `make demo`  and  `make test`.
# The virtualenv sees system packages, so a GPU machine keeps its own CUDA torch; a machine without torch
# gets the CPU build torch==2.13.0.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dsv4

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dsv4 demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
