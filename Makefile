# apt_ray: set-up, the default study, and the test suite. `make demo` and `make test`
# create .venv and install the project first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch by default; install your own CUDA build into .venv first to use GPUs:
# this step then does nothing.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-unit test-integration clean

# pip byte-compiles what it installs (it adds about a minute to the install). Without the .pyc files, a
# machine that sets PYTHONDONTWRITEBYTECODE compiles torch, Ray and transformers from source in every new
# process, and Ray starts a dozen processes per trial, so the Ray tests run 2-3 times slower.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --progress-bar off "$(TORCH_SPEC)"
	$(PY) -m pip install --progress-bar off -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) studies/sweep_meter.py

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration"

test-integration: $(STAMP)
	$(PY) -m pytest -m integration

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
