# Two commands a user needs (see README):
#   make demo   -- set everything up and run the whole pipeline on the embedded default
#   make test   -- set everything up (Neo4j jars included) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kgrec-installed
DEMO_OUT ?= demo_out

.PHONY: setup demo test bench neo4j-fetch browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.8
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

neo4j-fetch: setup
	$(VENV)/bin/kgrec neo4j fetch

demo: setup
	$(VENV)/bin/kgrec demo --out $(DEMO_OUT)

browser:
	bash scripts/install_browser.sh

test: setup neo4j-fetch browser
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
