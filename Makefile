PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp names the inputs' content, so editing requirements.txt or setup.py rebuilds.
STAMP  := $(VENV)/.stamp-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)

# Hugging Face's `kernels`, which owns the import name `kernels`: tests/test_release.py installs our
# wheel beside it in a fresh venv (fetched at set-up, like every other package; never at test time).
HF_KERNELS ?= kernels==0.17.2
# `make bench RECORD=1` also writes the records under benchmarks/results/.
RECORD ?=

.PHONY: demo test test-fast bench gpu-wheels clean-venv

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(VENV)/wheels $(HF_KERNELS)
	rm -f $(VENV)/.stamp-*
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

# The whole suite (CI runs this), with the 15 slowest tests named at the end.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests --durations=15

# For development: everything but the tests marked slow, distributed or subprocess (tests/conftest.py).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests -m "not slow and not distributed and not subprocess" --durations=10

# A table of the figures that matter (benchmarks/conftest.py), each beside its README target.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 RECORD=$(RECORD) $(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-only --benchmark-quiet

# The pure-Python packages a lent GPU machine lacks (its own torch/triton, Python 3.12), for
# benchmarks/gpu_check.sh, which installs them from .whl/ on that machine.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4

clean-venv:
	rm -rf $(VENV)
