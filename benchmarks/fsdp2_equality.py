"""How close an FSDP2-sharded run of the optimizer is to the single-process run (2 CPU processes, gloo).

Runs each case of ``tests/optim/distributed/test_fsdp2_optimizer.py`` (dct, svd, rsvd + Fira, random, DCT-fft/l1 with
SGD) and prints the largest difference of any parameter after six steps (refreshes at steps 0, 2, 4) and the bytes
one rank sent for refreshes.

    .venv/bin/python benchmarks/fsdp2_equality.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import test_fsdp2_optimizer as case  # noqa: E402
from tests.fsdp2_spawn import WORLD, free_port  # noqa: E402


def main() -> None:
    for name in case.CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rank0.pt")
            mp.spawn(case._worker, args=(free_port(), name, out), nprocs=WORLD, join=True)
            sharded = torch.load(out, weights_only=True)
        model = case._model()
        case._train(model, case._optimizer(model, {**case.CASES[name], "_name": name}), slice(None))
        diff = max((sharded["params"][n] - p.detach()).abs().max().item() for n, p in model.named_parameters())
        print(
            f"{name:18s} max |sharded - single| = {diff:.2e}   refresh bytes sent by rank 0: {sharded['refresh_bytes']}"
        )


if __name__ == "__main__":
    main()
