"""``Fabric(strategy="lowrank_ddp")`` and ``Fabric(strategy="lowrank_fsdp")`` on 2 CPU processes, run as a script:
both launch with Fabric's default ``popen`` launcher, which starts the second process by re-running this script (so
it cannot run inside pytest). Used by ``tests/fabric/test_fabric_strategy.py``.

    python tests/fabric/fabric_two_processes.py OUT_DIR

Writes ``OUT_DIR/ddp/rank{0,1}.pt`` and ``OUT_DIR/fsdp/rank{0,1}.pt`` (``loop.fit``: each rank's parameters, in full,
and its memory report's figures), and ``OUT_DIR/fsdp/refused{0,1}.txt``: the error ``fabric.setup(model, optimizer)``
gives under ``lowrank_fsdp`` with an optimizer built before the module was sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402

import lightning_lowrank  # noqa: E402, F401  (registers the strategy names)
from lightning_lowrank.fabric import LowRankFabricFSDPStrategy  # noqa: E402
from tests.fabric import loop  # noqa: E402


def main(out: Path) -> None:
    for sub in ("ddp", "fsdp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # The registered name; its default rank (128) is above the widths here, so the width here is 512.
    ddp = Fabric(strategy="lowrank_ddp", accelerator="cpu", devices=2)
    ddp.launch()
    loop.fit(ddp, out / "ddp", width=512)
    # The registered name; an optimizer built before fabric.setup holds the parameters FSDP2 replaces: refused.
    refusing = Fabric(strategy="lowrank_fsdp", accelerator="cpu", devices=2)
    refusing.launch()
    model = loop.Stack()
    try:
        refusing.setup(model, torch.optim.AdamW(model.parameters()))
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    (out / "fsdp" / f"refused{refusing.global_rank}.txt").write_text(refused)
    fsdp = Fabric(strategy=LowRankFabricFSDPStrategy(**loop.OPTIONS), accelerator="cpu", devices=2)
    fsdp.launch()
    loop.fit(fsdp, out / "fsdp", fsdp=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
