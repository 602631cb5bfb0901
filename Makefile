# Two entry points: `make demo` (real-data chain end to end) and `make test`.
# Each creates its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

.PHONY: venv test test-fast test-unit lint demo model
venv: $(VENV)/.installed

# Two workers, one test file each at a time (-n 2 --dist loadfile): the suite is compile-bound and
# XLA compiles on one thread, so two cores run two files. tests/conftest.py shares one XLA
# compilation cache across them and their subprocesses.
TEST_WORKERS ?= -n 2 --dist loadfile

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(TEST_WORKERS) --durations=25 tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not slow" tests

# The tests that need neither ../shared/data nor torch/transformers (markers put on by
# tests/conftest.py).
test-unit: $(VENV)/.installed
	$(PY) -m pytest -q $(TEST_WORKERS) -m "not realdata and not torch" tests

# ruff as configured in pyproject.toml (also run by tests/test_lint.py and pre-commit): lint, and
# check the formatting (`$(VENV)/bin/ruff format <paths>` applies it).
LINT_PATHS := demmae_jax data_pipelines scripts configs benchmarks tests
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo.sh $(DEMO_ARGS)

# The recommended building and road models, trained on every labelled area of ../shared/data
# (docs/results_product.md), into models/{buildings,roads} for scripts/predict.py --workdir.
model: $(VENV)/.installed
	$(PY) scripts/train_model.py --out $(or $(MODEL_OUT),models)
