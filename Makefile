# Two commands set everything up from scratch: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in $(VENV) and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cl_merge-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test lint install clean-venv results

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

# Test files run in parallel, one worker per core (at most 4: each worker imports torch); a test file
# stays in one worker so its module-scoped fixtures are built once. TEST_JOBS=1 runs them in this process.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

clean-venv:
	rm -rf $(VENV)

# Regenerates the committed mini-suite results (every strategy x 5 orders, leaderboard, plots, HTML report).
# Finished runs are skipped; delete results/mini/runs to recompute from scratch.
MINI := results/mini
MINI_EXPERTS := run.cache_dir=$(MINI)/runs/.cache run.threads=1
CLM := $(OFFLINE) $(VENV)/bin/cl-merge
.PHONY: results
# RESULTS_ENGINE=ray runs the grid's runs side by side on a local Ray instance (same result files).
RESULTS_ENGINE ?= local
results: $(STAMP)
	$(CLM) leaderboard results/leaderboard_mini.toml --quiet --engine $(RESULTS_ENGINE)
	$(CLM) plot matrix results/leaderboard_mini.toml --strategy saim --order 1 --out $(MINI)/plots/matrix_saim.png
	$(CLM) plot matrix results/leaderboard_mini.toml --strategy c-ft --order 1 --out $(MINI)/plots/matrix_c-ft.png
	$(CLM) plot curves results/leaderboard_mini.toml --out $(MINI)/plots/acc_sar_curves.png
	$(CLM) plot curves results/leaderboard_mini.toml --out $(MINI)/plots/acc_sar_curves.pdf
	$(CLM) plot delta-hist --learners adam sa_bcd --quiet --out $(MINI)/plots/delta_hist.png --data $(MINI)/plots/delta_hist.json $(MINI_EXPERTS)
	$(CLM) plot disentanglement --learners adam sa_bcd --others absent --quiet --out $(MINI)/plots/disentanglement_two_tasks.png --data $(MINI)/plots/disentanglement_two_tasks.json $(MINI_EXPERTS)
	$(CLM) plot disentanglement --learners adam sa_bcd --others fixed --quiet --out $(MINI)/plots/disentanglement_all_tasks.png --data $(MINI)/plots/disentanglement_all_tasks.json $(MINI_EXPERTS)
	$(CLM) report results/leaderboard_mini.toml results/leaderboard_mini_multitask.toml --html $(MINI)/report.html

# Errors and likely bugs (rules in pyproject's [tool.ruff]); formatting is not enforced.
.PHONY: lint
lint: $(STAMP)
	$(VENV)/bin/ruff check .
