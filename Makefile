# The two set-up commands of the README. Both create (or reuse) .venv, keyed on a hash of
# pyproject.toml so a second run installs nothing.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
# the shared data folder beside the clone serves as the dataset cache unless one is set
ifneq ($(wildcard ../shared/data),)
export SQ_SPADE_DATA_DIR ?= $(abspath ../shared/data)
endif
# frozen features are cached by a hash of the patches' pixels and the weights
export SQ_SPADE_CACHE_DIR ?= $(abspath .cache/features)

.PHONY: demo test env lint docs bench mutation clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test,docs,bench,plot,leiden]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

env: $(STAMP)

## the main job: real her2st sections -> SPADE -> prediction, metrics and figures in results/
demo: $(STAMP)
	$(VENV)/bin/python -m sq_spade.demo --out results

## the test suite (CI calls exactly this)
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup tests

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

## the mutation score (planted bugs against the tests that cover them; ~25 min, not part of CI)
mutation: $(STAMP)
	$(VENV)/bin/python benchmarks/mutation.py

clean:
	rm -rf $(VENV) docs/_build results
