# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv on first use, install, run the main job on embedded data
#   make test   -- create .venv on first use, install, run lint + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/demo

.PHONY: demo test lint venv clean bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip || true
	# A CPU build of torch first, so that torch>=2.4 below does not pull CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	# peers the tests compare against; --no-deps: BackPACK declares torchvision, which would pull a CUDA torch
	$(PY) -m pip install --no-deps "backpack-for-pytorch>=1.6" "curvlinops-for-pytorch>=2.0" "einconv>=0.1"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fisherlens run demo --out $(OUT)

test: venv
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider

bench: venv
	bash benchmarks/run.sh

clean:
	rm -rf $(VENV) runs
