# Two commands for a newcomer:  `make demo`  and  `make test`.
# Each creates its own isolated virtual environment in .venv (re-used when up to date).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/demo

.PHONY: demo test lint typecheck setup clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch is installed first, pinned to the 2.13 CPU build that pip finds locally
# (find-links); an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml examples/hmpc_amribt/pyproject.toml $(BIN)/activate
	$(BIN)/pip install "torch==2.13.*"
	$(BIN)/pip install -e ".[dev,bench,fmu]"
	$(BIN)/pip install -e examples/hmpc_amribt
	bash sim/opcua/setup_nodesets.sh
	bash sim/opcua/setup_lads_client.sh
	bash tests/support/setup_test_services.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/hmpc-sim demo --out $(OUT)
	@echo "Batch report: $(OUT)/run/report/BR01/report.html (historian: $(OUT)/run/historian.sqlite)"

lint: setup
	$(BIN)/ruff check plant_models controller sim tests examples
	$(BIN)/ruff format --check plant_models controller sim tests examples

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
