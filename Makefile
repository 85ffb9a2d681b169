# Two commands a user needs (see README):
#   make demo   -- set everything up and run the whole pipeline on the embedded default
#   make test   -- set everything up (Neo4j jars included) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kgrec-installed
DEMO_OUT ?= demo_out

.PHONY: setup demo test bench neo4j-fetch browser recbole-peer clean

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

# RecBole 1.2.1 in its own venv, to time its LightGCN next to ours (bench_ml100k --recbole-python)
RECBOLE_VENV ?= .venv-recbole
recbole-peer: setup
	test -x $(RECBOLE_VENV)/bin/python || $(VENV)/bin/uv venv -q --python $(PY) $(RECBOLE_VENV)
	$(VENV)/bin/uv pip install -q --python $(RECBOLE_VENV)/bin/python torch==2.15.0 numpy==1.26.4 scipy==1.11.4 \
	    pandas==2.2.3 scikit-learn==1.6.1 tqdm colorlog==4.7.2 colorama==0.4.4 pyyaml tensorboard tabulate texttable psutil requests
	$(VENV)/bin/uv pip install -q --python $(RECBOLE_VENV)/bin/python --no-deps recbole==1.2.1 \
	    thop==0.1.1.post2209072238 dgl==1.1.3

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
