#!/usr/bin/env bash
# Fresh machine -> .venv with every dependency -> the main job on a small default.
# Usage: bash scripts/setup.sh            (SKIP_DEMO=1 to only install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
if [ "${SKIP_DEMO:-0}" != "1" ]; then
  bash scripts/demo.sh
fi
