# The two commands a fresh machine needs: `make test` and `make demo`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-e2e demo bench lock clean

# Quick no-op when neither the lock file nor the package metadata changed. The lock's ~23,000 .py files are
# byte-compiled once here, on every core (24 s on 2 cores), instead of by pip one at a time: machines that set
# PYTHONDONTWRITEBYTECODE=1 (our CI image does) never write a .pyc at import, and every process of the e2e tier
# then compiled torch / transformers / DeepSpeed from source again (11.3 s of CPU to import the trainer instead
# of 5.1, measured). compileall's status is ignored: a few third-party files hold newer syntax on purpose
# (torch/testing/_internal/py312_intrinsics.py); Python could not import them either.
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q --no-compile -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $@

# The unit tier: every module, the losses against float64 references, in-process trainer steps,
# checkpoint and signal safety (881 tests, 3.0 min in a fresh clone's CI run, 2026-12-07).
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

# The end-to-end tier (marked `slow`): real `taid-vlm` / `deepspeed` launches in subprocesses,
# multi-process ZeRO runs, every shipped recipe, the docs' commands (91 tests, 12.3 min, 2026-12-07). CI runs both tiers.
# Two pytest processes side by side: most e2e time is one subprocess at a time on one core. Shard A is the
# docs' commands and the experiments CLI (they share the demo --quick fixture) plus the multi-process files
# that even out the two shards (in today's last CI run A took 739 s and 668 s of CPU, B 719 s and 700 s, per
# `--cpu-durations`, which lists the costliest tests at the end of each shard); shard B the rest. B prints as it runs, A's log is printed when both have ended; the target fails if either shard failed.
E2E_A := tests/test_docs_commands.py tests/test_experiments_cli.py tests/test_sampling_world_size.py \
         tests/test_remote_shards_train.py tests/test_generation_metric_zero3.py
E2E_REPORT := --durations=10 --cpu-durations=15 -p no:cacheprovider
test-e2e: setup
	@HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(E2E_REPORT) $(E2E_A) > .e2e-a.log 2>&1 & a=$$!; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow $(E2E_REPORT) $(addprefix --ignore=,$(E2E_A)) tests; \
	b=$$?; wait $$a; a=$$?; echo "== e2e shard B (the rest): exit $$b; shard A ($(E2E_A)): exit $$a"; cat .e2e-a.log; \
	test $$a -eq 0 && test $$b -eq 0

# Synthetic shards -> teacher VLM (CE) -> TAID and SFT students -> runs/demo/report.md (4.6 min on 2 busy CPU cores, 2026-12-07).
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
