#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the bundled example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/omct demo --out results/demo "$@"
