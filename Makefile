# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create (or reuse) .venv and install zeromix into it first.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On this CPU machine torch==2.13.0 resolves to a CPU wheel; on a GPU box pip takes the CUDA build.
# Pascal (GTX 10-series, P40, P100) needs a cu126 build: `make TORCH_SPEC="torch==2.13.0 --index-url <cu126 index>"`.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STAMP  := $(VENV)/.zeromix-installed
# DeepSpeed compiles its CPU ops into TORCH_EXTENSIONS_DIR, under a lock file (at install: workers/deepspeed_ops.py). The default
# (~/.cache/torch_extensions) is shared by every checkout on the machine: two checkouts rebuilt each other's ops
# and one waited 400 s on the other's stale lock. Each venv gets its own; the Ray nodes `zeromix up` starts
# inherit it.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
REPORTS := .test-reports

.PHONY: venv demo test test-fast gpu-check bench bench-plan bench-scheduler bench-slow-link bench-outer-memory bench-loss-memory down clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	# deepspeed's setup.py imports torch, so it must see the torch installed above.
	$(BIN)/python -m pip install --quiet --no-build-isolation $(DEEPSPEED_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# DeepSpeed's CPU ops (CPU Adam for an offloaded optimizer; on CPU, its shared-memory collectives), built now
	# rather than at a job's start (about 40 s and 25 s on 2 cores); never fails the install.
	$(BIN)/python -m workers.deepspeed_ops
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zeromix demo

# Everything (the README's one command). Every pytest run writes .test-reports/junit.xml (pyproject.toml);
# these also keep its output, the slowest tests at the end, in .test-reports/pytest.log.
test: $(STAMP)
	@mkdir -p $(REPORTS)
	$(BIN)/python -m pytest -q 2>&1 | tee $(REPORTS)/pytest.log; exit $${PIPESTATUS[0]}

# The edit-test loop: everything but the tests that start Ray clusters, DeepSpeed ranks or need a card.
test-fast: $(STAMP)
	@mkdir -p $(REPORTS)
	$(BIN)/python -m pytest -q -m "not cluster and not deepspeed and not gpu" 2>&1 | tee $(REPORTS)/pytest.log; exit $${PIPESTATUS[0]}

# On a box with an NVIDIA card: the GPU tier (tests/test_gpu.py) and its figures, as JSON and Markdown, in
# gpu-check/ (about 8 minutes on one card). TORCH_SPEC picks the build, e.g. cu126 for a Pascal card.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py --out gpu-check

bench: $(STAMP)
	$(BIN)/python bench/hetero_dp.py

bench-plan: $(STAMP)
	$(BIN)/python bench/planning_time.py

bench-scheduler: $(STAMP)
	$(BIN)/python bench/scheduler.py --seeds 11 12

# Needs root (network namespaces and tc): outer steps against synchronous over a 1 Gbit/s link, about 5 minutes.
bench-slow-link: $(STAMP)
	$(BIN)/python bench/slow_link.py

# What an outer step holds in memory on each rank, measured, beside the plan's estimate; about a minute.
bench-outer-memory: $(STAMP)
	$(BIN)/python bench/outer_memory.py

# What the loss holds in memory, the whole logits against a chunk of tokens at a time; about a minute.
bench-loss-memory: $(STAMP)
	$(BIN)/python bench/loss_memory.py

down: $(STAMP)
	$(BIN)/zeromix down

clean:
	rm -rf $(VENV) data runs $(REPORTS)
