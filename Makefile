# The two commands a fresh machine needs: `make test` and `make demo`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-e2e demo bench lock clean

# Quick no-op when neither the lock file nor the package metadata changed. --no-compile: pip would byte-compile
# all ~23,000 .py files of the lock (~2 ms of CPU each: transformers' 2,912 alone 6-7 s, measured); Python compiles
# the modules a command imports at their first import instead, once (the venv is writable).
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q --no-compile -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The unit tier: every module, the losses against float64 references, in-process trainer steps,
# checkpoint and signal safety (818 tests, 2.2 min on 2 quiet cores, 2026-12-06).
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

# The end-to-end tier (marked `slow`): real `taid-vlm` / `deepspeed` launches in subprocesses,
# multi-process ZeRO runs, every shipped recipe, the docs' commands (90 tests, 27.3 min on 2 quiet cores). CI runs both.
test-e2e: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow --durations=15 tests

# Synthetic shards -> teacher VLM (CE) -> TAID and SFT students -> runs/demo/report.md (22 min on 2 shared CPU cores).
demo: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m taid_vlm.cli demo --out runs/demo

bench: setup
	$(PY) benchmarks/loss_bench.py

# Re-resolve the pinned CPU install from requirements.in (needs the package registry).
lock:
	rm -rf /tmp/taid-lock-venv && $(PYTHON) -m venv /tmp/taid-lock-venv
	/tmp/taid-lock-venv/bin/pip install -q --upgrade "pip>=24" && /tmp/taid-lock-venv/bin/pip install -q -r requirements.in
	/tmp/taid-lock-venv/bin/pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
