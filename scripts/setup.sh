#!/usr/bin/env bash
# Create .venv and install omct with its test extras. torch is pinned through constraints.txt
# (the CPU wheel; an unpinned torch would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
