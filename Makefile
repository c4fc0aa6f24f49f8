# Both targets set everything up themselves: a .venv beside this file, atoll
# installed into it in editable mode with the extras the target needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atoll-installed
WORKDIR ?= runs/demo

.PHONY: demo test clean-venv

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev,robot]'
	touch $(STAMP)

# The main job: train the tiny LM on the embedded corpus (the running Python's
# standard library), then compare its bits per byte with the unigram bar.
demo: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=$(WORKDIR)

# Byte code is written on first import (pip's --no-compile above skips compiling
# every file of every package, ~50 s; a test run imports a fraction of them),
# even where the environment sets PYTHONDONTWRITEBYTECODE.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --durations=15 tests

clean-venv:
	rm -rf $(VENV)
