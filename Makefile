# Two commands: `make demo` trains the quickstart; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PYTHONUNBUFFERED := 1

.PHONY: demo test lint format clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart

# --dist loadscope: each test module runs on one worker, so a module fixture
# is built once, not once per worker; the modules are sent longest first
# (tests/conftest.py orders them), so the two workers finish together.
# --durations lists the slowest tests, to keep LONGEST_MODULES_FIRST current.
test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) scripts/check_structure.py
	$(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder \
		--durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) scripts/check_structure.py

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
