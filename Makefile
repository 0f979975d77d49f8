PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp names the inputs' content, so editing requirements.txt or setup.py rebuilds.
STAMP  := $(VENV)/.stamp-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test bench gpu-wheels clean-venv

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

# The pure-Python packages a lent GPU machine lacks (its own torch/triton, Python 3.12), for
# benchmarks/gpu_check.sh: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4

clean-venv:
	rm -rf $(VENV)
