# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create (or reuse) .venv and install zeromix into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# On this CPU machine torch==2.13.0 resolves to a CPU wheel; on a GPU box pip takes the CUDA build.
# Pascal (GTX 10-series, P40, P100) needs a cu126 build: `make TORCH_SPEC="torch==2.13.0 --index-url <cu126 index>"`.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STAMP  := $(VENV)/.zeromix-installed

.PHONY: venv demo test gpu-check bench bench-plan bench-scheduler down clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	# deepspeed's setup.py imports torch, so it must see the torch installed above.
	$(BIN)/python -m pip install --quiet --no-build-isolation $(DEEPSPEED_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zeromix demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# On a box with an NVIDIA card: the GPU tier (tests/test_gpu.py) and its figures, as JSON and Markdown, in
# gpu-check/ (about 8 minutes on one card). TORCH_SPEC picks the build, e.g. cu126 for a Pascal card.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py --out gpu-check

bench: $(STAMP)
	$(BIN)/python bench/hetero_dp.py

bench-plan: $(STAMP)
	$(BIN)/python bench/planning_time.py

bench-scheduler: $(STAMP)
	$(BIN)/python bench/scheduler.py

down: $(STAMP)
	$(BIN)/zeromix down

clean:
	rm -rf $(VENV) data runs
