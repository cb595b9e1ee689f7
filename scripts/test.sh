#!/usr/bin/env bash
# The test command: sets up .venv if needed, then lint and the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
"$VENV_PY" -m ruff check .
"$VENV_PY" -m ruff format --check .
"$VENV_PY" -m pytest -q -p no:cacheprovider "$@"
