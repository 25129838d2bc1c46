# attncomm: `make run` runs the default job, `make test` the whole test suite.
# Both create .venv (Python 3.11) and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on our machines this takes the local CPU wheel; a GPU user installs their own build first
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) run.py $(ARGS)

# pytest runs with bytecode caching on even where PYTHONDONTWRITEBYTECODE is set (our machines set it):
# otherwise every run, in every xdist worker, compiles attncomm and assertion-rewrites the test modules
# again (2-3 s of CPU per process); the caches are the gitignored __pycache__ directories
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest

# one pytest-xdist worker per core; the SLURM tests share one worker, as do the browser tests
test: install
	$(PY) -m ruff check attncomm tests run.py
	$(PYTEST) -n auto --dist loadgroup $(PYTEST_ARGS)

# the unit and exactness tiers: no subprocess CLI runs, browser, SLURM or minute-long end-to-end tests;
# one pytest-xdist worker per core (each computes on one thread)
test-fast: install
	$(PY) -m ruff check attncomm tests run.py
	$(PYTEST) -n auto -m "not slow and not cli and not browser and not slurm" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check attncomm tests run.py
	$(PY) -m ruff format --check attncomm tests run.py

format: install
	$(PY) -m ruff format attncomm tests run.py
	$(PY) -m ruff check --fix attncomm tests run.py

bench: install
	$(PY) -m attncomm.bench all
	$(PY) -m attncomm.bench act_patch --prompts 1
	$(PY) -m attncomm.bench eap --prompts 64
	$(PY) -m attncomm.bench evaluate --prompts 64

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
