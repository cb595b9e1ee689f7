"""The test suite, laid out as the package is (tests/optim/update/ tests lightning_lowrank/optim/update/, ...),
plus tests/parity/ (against the reference implementations and saved checkpoints) and tests/integration/ (the
benchmark scripts end to end). Shared models: tests/models.py."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
