#!/usr/bin/env bash
# The test command: sets up .venv if needed, then lint, the documentation build and the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
"$VENV_PY" -m ruff check .
"$VENV_PY" -m ruff format --check .
# The documentation site: a broken link, a bad docstring section or a page left out of the nav fails here.
NO_MKDOCS_2_WARNING=1 "$VENV_PY" -m mkdocs build --strict --quiet --site-dir "${TMPDIR:-/tmp}/lightning-lowrank-site"
"$VENV_PY" -m pytest -q -p no:cacheprovider "$@"
