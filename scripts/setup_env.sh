#!/usr/bin/env bash
# Creates .venv (once) and installs torch, the package and its test tools into it.
# Sourced by demo.sh and test.sh; safe to run again (installs nothing that is already there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY="$PWD/.venv/bin/python"
# torch first and pinned: an unpinned torch pulled in by lightning would be a multi-GB CUDA build.
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VENV_PY" -m pip install --quiet --disable-pip-version-check -e ".[test,docs]"
export VENV_PY
