# Set-up and common tasks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-full bench clean

venv: $(STAMP)

# torch==2.13.0 first: it comes from a local CPU wheel, so the project's torch>=2.4 is already
# satisfied and pip never pulls a multi-GB CUDA build. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest

test-full: venv
	ASYNC_CKPT_SLOW=1 $(PY) -m pytest

bench: venv
	$(PY) -m perf.stall

clean:
	rm -rf build dist src/*.egg-info demo_output perf/results/tmp
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
