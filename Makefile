# Two commands do everything: `make demo` and `make test`. Both set up .venv and data/ on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.yaml
# CPU build of PyTorch unless a GPU is visible (then the default CUDA build from PyPI).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: setup demo test data clean

setup: $(VENV)/.installed data/SOURCES.json data/eval/manifest.json data/instructions/SOURCES.json \
       data/preferences/SOURCES.json

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	touch $@

data/SOURCES.json: scripts/fetch_data.py | $(VENV)/.installed
	$(BIN)/python scripts/fetch_data.py --dest data

# lm-eval tasks (cloze, continuation choice) built from the fetched books and news: see configs/lm_eval/README.md
data/eval/manifest.json: scripts/build_eval_tasks.py data/SOURCES.json
	$(BIN)/python scripts/build_eval_tasks.py --data data

# instruction pairs from the Python FAQ (Debian python3.11-doc): see scripts/build_instructions.py
data/instructions/SOURCES.json: scripts/build_instructions.py | $(VENV)/.installed
	$(BIN)/python scripts/build_instructions.py --data data

# preference pairs for DPO from those pairs (chosen: the answer; rejected: another question's): build_preferences.py
data/preferences/SOURCES.json: scripts/build_preferences.py data/instructions/SOURCES.json
	$(BIN)/python scripts/build_preferences.py --data data

data: data/SOURCES.json data/eval/manifest.json data/instructions/SOURCES.json data/preferences/SOURCES.json

demo: setup
	$(BIN)/athanor run $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs/ .pytest_cache
