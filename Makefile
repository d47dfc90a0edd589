# One command each on a fresh Linux machine with Python 3.11:
#   make reproduce   set up .venv and run the embedded default to results/report/table1.csv
#   make test        set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
CORES  ?= all
BIN    := $(VENV)/bin
# Offline machines: a mirror folder of the external data (see resources/external.yaml).
# Defaults to ../shared/data when that folder exists next to the repository.
OCTASTEM_MIRROR ?= $(abspath $(wildcard ../shared/data))
export OCTASTEM_MIRROR

.PHONY: env reproduce report paper-dryrun test test-slurm lint clean

$(BIN)/octastem: envs/requirements.txt envs/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r envs/requirements.txt -c envs/constraints.txt
# quantem without its dependencies (listed in envs/requirements.txt): it requires torchvision, whose only
# wheel for torch 2.13.0 is CUDA-linked and fails to import on the CPU torch build (breaking torchmetrics
# and with it MACE); quantem itself never imports torchvision
	$(BIN)/pip install --quiet --no-deps quantem==0.1.10
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

env: $(BIN)/octastem

reproduce: env
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores $(CORES) --report results/report/report.html

paper-dryrun: env
	$(BIN)/snakemake -n --configfile config/paper.yaml --profile profiles/slurm

lint: env
	$(BIN)/ruff check src tests benchmarks workflow/scripts
	$(BIN)/snakemake --lint

# lint, then the unit tests, then the workflow tests (marked slow: Snakemake end to end, minutes);
# each step stops `make` at its first failure
test: lint
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/python -m pytest -q -m slow

# The tiny config through profiles/slurm on a one-node SLURM cluster started on this machine
# (Debian/Ubuntu; installs slurm-wlm and munge with apt, needs root or sudo); stopped afterwards.
test-slurm: env
	PYTHON=$(BIN)/python tests/slurm/run.sh --stop

clean:
	rm -rf results/* .snakemake logs
