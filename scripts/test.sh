#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check omct tests benchmarks examples
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
