"""EATA without the Fisher regulariser, i.e. ETA (Niu et al., ICML 2022).

Per batch: the entropy H of each prediction; keep the reliable samples (H < E0 = e_margin·ln C) whose
softmax is not redundant (|cos| to an EMA(0.9) of the mean softmax of the samples used so far
< d_margin; on the first batch with reliable samples there is no EMA yet, so every reliable sample
counts); loss = mean over the kept samples of H / exp(H − E0); one optimizer step on the norm layers'
affine parameters. The EMA moves with the mean softmax of the kept samples.

Everything stays on the device: the filters are masks, not index lists. When no sample survives, the
reference skips the optimizer step; here the step runs on a zero gradient and the affine parameters are
put back (no host sync), so they do not move either — only the optimizer's moments decay by one step
(Adam / momentum), which the reference's skipped step would not do."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from app.contract.catalog.tta import EATAParams

from ._tta import NormAffineMethod, masked_mean, nothing_selected
from .base import StepOutput, softmax_entropy
from .registry import implements

EMA_MOMENTUM = 0.9  # of the mean probability vector (reference: fixed 0.9)


@implements(EATAParams)
class EATA(NormAffineMethod):
    state_attrs = ("probs_ema", "probs_ema_valid")

    def configure(self) -> None:
        super().configure()
        c = self.ctx.num_classes
        self.e0 = self.params.e_margin * math.log(c)
        dev = self.ctx.device
        self.probs_ema = torch.full((c,), 1.0 / c, device=dev)
        self.probs_ema_valid = torch.zeros((), dtype=torch.bool, device=dev)
        self.reliable_total = torch.zeros((), device=dev)
        self.used_total = torch.zeros((), device=dev)
        self.seen_total = 0

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with self.ctx.autocast():
            logits = self.model(x)
        logits = logits.float()
        ent = softmax_entropy(logits)
        probs = logits.softmax(1)
        with torch.no_grad():
            reliable = ent < self.e0
            cos = F.cosine_similarity(self.probs_ema.unsqueeze(0), probs.detach(), dim=1)
            novel = torch.where(self.probs_ema_valid, cos.abs() < self.params.d_margin, torch.ones_like(reliable))
            used = reliable & novel
            coeff = torch.exp(-(ent.detach() - self.e0))  # 1 / exp(H − E0)
        loss, n_used = masked_mean(ent * coeff, used)
        keep = n_used > 0
        if not nothing_selected(used):
            before = [q.detach().clone() for q in self.norm_params]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                for q, old in zip(self.norm_params, before):
                    q.copy_(torch.where(keep, q, old))
        with torch.no_grad():
            # EMA of the mean softmax of the used samples (initialised by the first non-empty batch)
            sel_mean = (probs.detach() * used.unsqueeze(1)).sum(0) / n_used.clamp_min(1.0)
            mixed = torch.where(self.probs_ema_valid,
                                EMA_MOMENTUM * self.probs_ema + (1 - EMA_MOMENTUM) * sel_mean, sel_mean)
            self.probs_ema = torch.where(keep, mixed, self.probs_ema)
            self.probs_ema_valid = self.probs_ema_valid | keep
            n_reliable = reliable.float().sum()
            self.reliable_total += n_reliable
            self.used_total += n_used
        self.seen_total += x.shape[0]
        return StepOutput(logits.detach(), loss.detach(),
                          {"reliable": n_reliable, "used": n_used.detach()})

    def report(self) -> dict[str, Any]:
        return {"images_seen": self.seen_total, "reliable_samples": int(self.reliable_total.item()),
                "samples_used_for_updates": int(self.used_total.item()),
                "e_margin_nats": self.e0, "d_margin": self.params.d_margin}
