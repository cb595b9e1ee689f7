"""lowrank_ddp and lowrank_fsdp, the same run on 2 CPU processes each (``tests/ddp_fsdp_signs.py``): with the default
options (``svd_signs="max_abs"``) they agree after SVD refreshes to float32 rounding. (With ``"none"`` a refresh may
return a column of P with the other sign on one of them, and the momentum kept in that coordinate then points the
other way: 2.4e-2 apart on this machine; machine-dependent, so not asserted.)"""

import subprocess
import sys

import pytest
import torch

from tests import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo workers")


def test_ddp_and_fsdp_agree_after_refreshes_with_the_default_signs(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_fsdp_signs.py"), str(tmp_path), "default"], check=True)
    ddp, fsdp = (torch.load(tmp_path / f"{kind}_default.pt", weights_only=True) for kind in ("ddp", "fsdp"))
    for name, p in ddp.items():
        torch.testing.assert_close(fsdp[name], p, rtol=0, atol=1e-5, msg=name)
