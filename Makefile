# Two commands a user needs: `make demo` and `make test`. Everything else is bootstrap.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-multinode lint format unit clean

install: $(STAMP)

# The stamp depends on the files that define the stack, so a second run installs nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,dev]"
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, ray; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/exfm run --storage runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not ray and not slow" -q

# The unit and model tiers run beside the Ray tier (tests/run_tiers.sh says why); `pytest` alone
# still runs the whole suite in one process.
test: lint
	tests/run_tiers.sh $(BIN)/python --durations=15

# A 4-node Ray cluster on this machine (a raylet per node type of cluster.yaml), the whole loop
# submitted through the Jobs API; part of `make test` too.
test-multinode: $(STAMP)
	$(BIN)/python -m pytest -q tests/ray/test_multinode.py

clean:
	rm -rf $(VENV) runs .pytest_cache
