# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
# LSST middleware needs Python >= 3.12: take the first interpreter that is.
PYTHON ?= $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	$$HOME/.pyenv/versions/3.13*/bin/python3.13; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
# The Rucio server (tests and `make rucio-up` only) has pins of its own: its own venv.
RUCIO_VENV := .rucio-venv
CORES ?= 2

.PHONY: setup profiles system-deps rucio-setup rucio-up rucio-down demo test lint bench bench-rucio bench-planner bench-dryrun bench-forecast clean slurm-setup slurm-up slurm-down htcondor-setup

setup: $(VENV)/.installed profiles

# `snakemake --profile in2p3` looks in ~/.config/snakemake: link the site profiles there
# (an existing profile of the same name that is not ours is left alone, with a warning).
PROFILE_DIR ?= $(HOME)/.config/snakemake
profiles:
	@mkdir -p $(PROFILE_DIR)
	@for p in usdf in2p3 ral lancs local; do \
		target=$(PROFILE_DIR)/$$p; \
		if [ -e $$target ] && [ "$$(readlink -f $$target)" != "$(CURDIR)/profiles/$$p" ]; then \
			echo "warning: $$target exists and is not this project's profile; left alone"; \
		else ln -sfn $(CURDIR)/profiles/$$p $$target; fi; \
	done

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.12 found; set PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	time $(BIN)/snakemake --cores $(CORES)
	$(BIN)/multisite summary config/config.yaml

# Debian packages the tests use (run as root): Chromium renders the campaign report;
# PostgreSQL 15 backs the test Rucio server.
system-deps:
	@command -v chromium >/dev/null && test -x /usr/lib/postgresql/15/bin/initdb || \
		{ apt-get update -qq && apt-get install -y -qq chromium postgresql; }

rucio-setup: $(RUCIO_VENV)/.installed

$(RUCIO_VENV)/.installed: requirements-rucio-server.txt
	test -x $(RUCIO_VENV)/bin/python || $(PYTHON) -m venv $(RUCIO_VENV)
	$(RUCIO_VENV)/bin/pip install -q --upgrade pip
	$(RUCIO_VENV)/bin/pip install -q -r requirements-rucio-server.txt
	touch $@

# A local, real Rucio (PostgreSQL, server, daemons) for running the demo with transfer.backend: rucio.
rucio-up: setup system-deps rucio-setup
	scripts/rucio_local.sh up

rucio-down:
	scripts/rucio_local.sh down

# Debian's Slurm and munge (run as root) for tests/test_slurm.py and `make slurm-up`.
slurm-setup:
	tests/slurm_harness/slurm_local.sh install

# A local single-node Slurm, its state in $(SLURM_DIR); then run the workflow with
# `--profile tests/profiles/slurm` after the two `export` lines slurm-up prints.
SLURM_DIR ?= /tmp/multisite-slurm
slurm-up: slurm-setup
	tests/slurm_harness/slurm_local.sh up $(SLURM_DIR)

slurm-down:
	tests/slurm_harness/slurm_local.sh down $(SLURM_DIR)

# A Debian 13 chroot with HTCondor (debootstrap, minicondor; run as root, needs the Debian
# mirror) in $(HTCONDOR_POOL), for tests/test_htcondor.py; done once, later runs reuse it.
HTCONDOR_POOL ?= /var/tmp/htcondor-pool
htcondor-setup:
	tests/htcondor_harness/htcondor_local.sh install $(HTCONDOR_POOL)

test: setup system-deps rucio-setup slurm-setup htcondor-setup
	$(BIN)/pytest

# The workflow's lint is `snakemake --lint` less its "conda environment or container for each
# rule" finding: rules run in the LSST stack (cvmfs, conda stackvana); see multisite/lint.py.
lint: setup
	$(BIN)/ruff check multisite scripts tests benchmarks
	$(BIN)/ruff format --check multisite scripts tests benchmarks
	$(BIN)/python -m multisite.lint

bench: setup
	$(BIN)/python benchmarks/bench_demo.py

# Each kind at two sizes: memory must not grow with the hand-off (raws in export parts of 1,000).
bench-rucio: setup system-deps rucio-setup
	$(BIN)/python benchmarks/bench_rucio.py --kind raw --datasets 2000 --import-batch 1000
	$(BIN)/python benchmarks/bench_rucio.py --kind raw --datasets 10000 --import-batch 1000
	$(BIN)/python benchmarks/bench_rucio.py --kind product --datasets 10000
	$(BIN)/python benchmarks/bench_rucio.py --kind product --datasets 100000

bench-planner: setup
	$(BIN)/python benchmarks/bench_planner.py

bench-dryrun: setup
	$(BIN)/python benchmarks/bench_dryrun.py

bench-forecast: setup
	$(BIN)/python benchmarks/bench_forecast.py

clean:
	rm -rf work .snakemake
