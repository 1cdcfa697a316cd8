# c2c-replication: `make reproduce` regenerates the results, `make test` runs the tests.
# Both create the virtual environment .venv on first use (`make setup`).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the pinned, tested version; override for another build, e.g. TORCH_SPEC="torch==2.13.0+cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test reproduce announce quickstart models-small data-offline lab clean-results $(NOTEBOOKS)

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
GPU_PRESENT := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(origin PROFILE), undefined)
  PROFILE := $(if $(GPU_PRESENT),paper,tiny)
  PROFILE_REASON := chosen automatically: $(if $(GPU_PRESENT),a CUDA device is present,no CUDA device found)
else
  PROFILE_REASON := set on the command line
endif

NOTEBOOKS := 01_oracle_cache_enrichment 02_layer_enrichment 03_train_fuser 04_main_table 05_latency 06_tsne \
             07_ablations 08_knowledge_transfer
EXECUTED := results/$(PROFILE)/notebooks
PROFILE_INPUTS := $(if $(filter small,$(PROFILE)),models-small data-offline)

reproduce: announce $(NOTEBOOKS)
	@echo "make reproduce: done; tables in results/$(PROFILE)/, figures in figures/$(PROFILE)/, executed notebooks in $(EXECUTED)/"

announce:
	@echo "make reproduce: PROFILE=$(PROFILE) ($(PROFILE_REASON))"
	@test -f params/$(PROFILE).yaml || { echo "unknown PROFILE=$(PROFILE): use tiny, small or paper"; exit 2; }
	@if [ "$(PROFILE)" = paper ]; then \
	  [ -n "$(GPU_PRESENT)" ] || { echo "PROFILE=paper needs a CUDA GPU; use PROFILE=small (real offline models) or PROFILE=tiny"; exit 2; }; \
	  $(PYTHON) -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=10)" 2>/dev/null || \
	    { echo "PROFILE=paper needs the Hugging Face hub, which cannot be reached; use PROFILE=small or PROFILE=tiny"; exit 2; }; \
	fi

# One target per notebook (`make 03_train_fuser`), executed by papermill with the profile's parameters;
# a finished notebook is not redone unless it, its parameters, or a notebook it reads from changed.
$(NOTEBOOKS): %: $(EXECUTED)/%.ipynb

$(EXECUTED)/%.ipynb: notebooks/%.ipynb params/$(PROFILE).yaml | $(STAMP) $(PROFILE_INPUTS)
	@mkdir -p $(EXECUTED)
	$(PY) -m papermill $< $(@:.ipynb=.partial.ipynb) -f params/$(PROFILE).yaml --cwd notebooks --log-level ERROR
	@mv $(@:.ipynb=.partial.ipynb) $@

# notebooks that read what an earlier one wrote
$(EXECUTED)/04_main_table.ipynb: $(EXECUTED)/03_train_fuser.ipynb

quickstart: $(STAMP)
	$(PY) -m c2c.quickstart

models-small: $(STAMP)
	$(PY) -m c2c.offline models

data-offline: $(STAMP)
	$(PY) -c "from c2c.benchmarks import fetch_offline_benchmarks; print(fetch_offline_benchmarks())"
	$(PY) -c "from c2c.data import natural_instructions_file; print(natural_instructions_file())"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-results:
	rm -rf results/$(PROFILE) figures/$(PROFILE)
