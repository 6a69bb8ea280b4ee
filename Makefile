# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) -m pipeline.demo $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf demo_out runs .pytest_cache
