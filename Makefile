# c2c-replication: `make reproduce` regenerates the results, `make test` runs the tests.
# Both create the virtual environment .venv on first use (`make setup`).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the pinned, tested version; override for another build, e.g. TORCH_SPEC="torch==2.13.0+cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test reproduce quickstart models-small data-offline lab clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The profile: paper where a CUDA device is present, else tiny (the offline tiny pair on CPU).
CUDA_PRESENT = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
ifeq ($(origin PROFILE), undefined)
  PROFILE_REASON = chosen automatically: $(if $(filter 1,$(CUDA_PRESENT)),a CUDA device is present,no CUDA device found)
else
  PROFILE_REASON = set on the command line
endif

reproduce: $(STAMP)
	@profile=$${PROFILE:-$$($(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'tiny')")}; \
	echo "make reproduce: PROFILE=$$profile ($(PROFILE_REASON))"; \
	$(MAKE) --no-print-directory quickstart

quickstart: $(STAMP)
	$(PY) -m c2c.quickstart

models-small: $(STAMP)
	$(PY) -m c2c.offline models

data-offline: $(STAMP)
	$(PY) -c "from c2c.benchmarks import fetch_offline_benchmarks; print(fetch_offline_benchmarks())"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-results:
	rm -rf results/tiny figures/tiny
