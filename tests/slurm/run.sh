#!/usr/bin/env bash
# The tiny config through profiles/slurm on the local one-node cluster (started if needed), with
# the sbatch requests checked: tests/test_slurm.py. The working folder, with the full Snakemake
# log (snakemake-slurm.log, every "sbatch call:"), is kept in $OCTASTEM_SLURM_WORK
# (default /tmp/octastem-slurm-test). `--stop` stops the cluster afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
as_root tests/slurm/setup.sh
status=0
OCTASTEM_SLURM_TESTS=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_slurm.py \
    --basetemp="${OCTASTEM_SLURM_WORK:-/tmp/octastem-slurm-test}" || status=$?
if [[ "${1:-}" == "--stop" ]]; then
    as_root tests/slurm/stop.sh
fi
exit "$status"
