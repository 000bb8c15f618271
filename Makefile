# Two commands set everything up from scratch: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in $(VENV) and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cl_merge-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test install clean-venv

install: $(STAMP)

# Re-install when the dependency list changes. torch is installed first with its exact pin so that
# pip takes the CPU build and never resolves a CUDA build for another package's range.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/cl-merge demo

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
