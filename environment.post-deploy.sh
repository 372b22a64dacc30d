#!/usr/bin/env bash
# Run by Snakemake inside the conda environment of environment.yml right after creating it
# (--software-deployment-method conda), from the workflow's working directory (the repository
# root): installs the smnn package of this checkout, editable, without touching dependencies.
set -euo pipefail
python -m pip install --no-deps -e .
