#!/usr/bin/env bash
# The demo command: sets up .venv if needed, then trains the byte-level LM on the stdlib source.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
"$VENV_PY" examples/train_stdlib_lm.py "$@"
