"""The dense baseline every saving is measured against: the state the module's own torch optimizer would hold, and
the warning when the low-rank state holds more."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lowrank.memory.figures import MemoryReport, format_bytes, tensor_bytes
from lightning_lowrank.selection import warn_user

_STEP_BYTES = torch.tensor(0.0).element_size()  # torch's optimizers keep ``step`` as a float32 scalar tensor
RULE_NAMES = {"adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor", "muon": "Muon"}
MAX_NAMED = 8  # layers named in a warning before the list is cut to "... and N more"


def baseline_state_bytes(param: Tensor, group: dict) -> int:
    """Bytes the module's own torch optimizer (the group's rule, dense) holds for ``param`` once it has stepped:
    AdamW/Adam two moments and a step; SGD a momentum buffer (none without momentum); Adafactor a step and
    row/column statistics (a full variance for vectors); Muon a momentum buffer (and no step)."""
    rule, es = group.get("rule", "adamw"), param.element_size()
    if rule == "sgd":
        return tensor_bytes(param) if group.get("momentum", 0) else 0
    if rule == "muon":
        return tensor_bytes(param)
    if rule == "adafactor":
        if param.dim() < 2:
            return tensor_bytes(param) + _STEP_BYTES
        rows, cols = param.numel() // param.shape[-1], param.numel() // param.shape[-2]
        return (rows + cols) * es + _STEP_BYTES
    return 2 * tensor_bytes(param) + _STEP_BYTES


def warn_negative_saving(report: MemoryReport) -> None:
    """One warning when ``report`` shows a negative saving, naming the layers that hold more state than dense (the
    first ``MAX_NAMED``), or the shared DCT bases when no layer does. Silent when everything saves or breaks even."""
    trion = {layer.name for layer in report.layers if layer.projector == "trion"}
    costly = [name for name in report.costly_layers() if name not in trion]  # Trion saves no state by design
    if not costly and (report.saving_bytes >= 0 or (report.layers and len(trion) == len(report.layers))):
        return
    protected = report.state_by_kind.get("protected_bases", 0)
    if protected and report.saving_bytes + protected >= 0:
        return  # the protected bases (ProtectedSubspaces) are the price of protection, not a misconfigured state
    base = report.baseline
    total = f"in total it saves {report.saving_text()}"
    if costly:
        by_name = {layer.name: layer for layer in report.layers}
        shown = []
        for name in costly[:MAX_NAMED]:
            layer = by_name.get(name)
            detail = f" (rank {layer.rank}, {layer.projector})" if layer else ""
            shown.append(name + detail)
        more = f" and {len(costly) - MAX_NAMED} more" if len(costly) > MAX_NAMED else ""
        message = (
            f"{len(costly)} layer(s) hold more optimizer state than dense {base} would (negative saving): "
            f"{', '.join(shown)}{more}; {total}. A rank near the smaller side, or a P (d x r) next to a small dense "
            "state (Adafactor's), costs more than it saves: lower `rank`, pick a projector that stores less "
            "(dct, random), or leave these layers out (`exclude`)."
        )
    elif report.shared_basis_bytes:
        message = (
            f"The low-rank state holds more than dense {base} would: every layer saves, but the shared DCT bases "
            f"({format_bytes(report.shared_basis_bytes)}) outweigh it; {total}. dct_scorer='fft' keeps no d x d basis."
        )
    else:
        message = (
            f"The low-rank state holds more than dense {base} would: no projected layer costs more, but this "
            f"optimizer's step counters ({format_bytes(report.state_by_kind['scalars'])} in all, one per parameter"
            f"{', which torch.optim.SGD does not keep' if base == 'SGD' else ''}) outweigh the saving; {total}."
        )
    warn_user(message)
