"""Make an adapted model deployable: re-estimate BatchNorm running statistics on the target data
(so it works in eval() mode without batch statistics) and serialise it as safetensors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from ..methods.norm import BATCH_NORMS


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor], autocast=None) -> int:
    """Replace every BatchNorm's running mean/var by the average over `batches` (momentum=None is a
    cumulative moving average). Other layers stay in eval mode. Returns the number of batches seen."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x in batches:
        if x.shape[0] < 2:
            continue  # a single sample gives no variance for BatchNorm1d
        if autocast is not None:
            with autocast():
                model(x)
        else:
            model(x)
        seen += 1
    for m, (momentum, _training) in zip(bns, saved):
        m.momentum = momentum
    model.eval()
    return seen


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata or {})
