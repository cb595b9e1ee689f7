#!/usr/bin/env bash
# Installs the published low-rank optimizers ("peers") into .venv for benchmarks/ only; the package never imports them.
#
# Every peer goes in with --no-deps: their requirements name transformers, bitsandbytes, wandb, triton and an unpinned
# torch, any of which could replace the CPU torch with a multi-GB CUDA build. What they import at module load
# (transformers.utils.versions, bitsandbytes, wandb, gpustat, triton) is stubbed by benchmarks/peers.py instead.
# bitsandbytes (Q-GaLore's 8-bit state) is tried with --no-deps when BENCH_BNB=1; without a working build the
# benchmark reports Q-GaLore as "not run: <reason>".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV_PY="${VENV_PY:-$PWD/.venv/bin/python}"
PIP=("$VENV_PY" -m pip install --quiet --disable-pip-version-check --no-deps)

# fira ships only an sdist: build it with the venv's own setuptools rather than an isolated (downloaded) one.
"${PIP[@]}" --no-build-isolation \
    "galore-torch==1.0" \
    "q-galore-torch==1.0" \
    "fira==1.0.2" \
    "apollo-torch==1.0.3" \
    "ista-daslab-optimizers==1.1.15" \
    "sophia-opt==0.2.2"

if [ "${BENCH_BNB:-0}" = "1" ]; then
    "${PIP[@]}" bitsandbytes || echo "bitsandbytes did not install; Q-GaLore will be reported as not run"
fi

"$VENV_PY" - <<'EOF'
import importlib.util

for name in ("galore_torch", "q_galore_torch", "fira", "apollo_torch", "ista_daslab_optimizers", "sophia_opt", "bitsandbytes"):
    print(f"{name:24s} {'installed' if importlib.util.find_spec(name) else 'missing'}")
EOF
