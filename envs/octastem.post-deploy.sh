#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) after it creates the environment of octastem.yaml, with $CONDA_PREFIX
# set to it. quantem (reconstruct methods ssb and wdd) is installed without its dependencies, as the
# Makefile does: it requires torchvision, whose only wheel for torch 2.13.0 is CUDA-linked and fails to
# import on the CPU torch build (breaking torchmetrics and with it MACE); quantem never imports it. Its
# other requirements are in requirements.txt.
set -euo pipefail
"$CONDA_PREFIX/bin/pip" install --no-deps quantem==0.1.10
