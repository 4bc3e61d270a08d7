# qalign-repro — every target installs what it needs into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build);
# GPU machines keep whatever CUDA build satisfies pyproject's range. Override with TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
OVERRIDES ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint reproduce-tiny clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -z "$(HAS_GPU)" ]; then echo "no GPU found: installing $(TORCH_SPEC) (CPU)"; $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job on the embedded default: ancestral samples + QAlign chains on the arithmetic task with the
# shipped tiny LM and RM, then evaluate, predict and plot (figures/tables under results/).
demo: install
	$(PY) -m qalign_repro.run experiment=tiny method=ancestral $(OVERRIDES)
	$(PY) -m qalign_repro.run experiment=tiny method=qalign $(OVERRIDES)
	$(PY) -m qalign_repro.evaluate experiment=tiny runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.predict experiment=tiny runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.plot experiment=tiny runs=all $(OVERRIDES)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests scripts

clean-results:
	find results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
