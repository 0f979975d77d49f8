PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp names the inputs' content, so editing requirements.txt or setup.py rebuilds.
STAMP  := $(VENV)/.stamp-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test bench clean-venv

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-*
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,median,max,rounds

clean-venv:
	rm -rf $(VENV)
