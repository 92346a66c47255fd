"""ROID (Marsden, Döbler & Yang, WACV 2024: universal TTA through weight ensembling, diversity
weighting and prior correction). Updates the norm layers' affine parameters (BatchNorm on batch
statistics). Per batch:
1. logits of the model as it is (the prediction, before any update);
2. weights (no gradient): diversity d = 1 − cos(softmax, EMA of the mean softmax), certainty
   c = −entropy, each min-max normalised over the batch; w = exp(d·c / T), T = 1/3; samples with d below
   the batch mean get w = 0 (dropped). The EMA (momentum 0.9, starting uniform) then moves to this
   batch's mean softmax;
3. loss = Σ w·SLR(logits) / N, SLR the soft likelihood ratio −Σ_c p_c·log(p_c / (1 − p_c) + 1e-5) with
   p clipped at 0.99; plus Σ w·SCE(augmented logits, logits) / N over the kept samples, SCE the
   symmetric cross-entropy (½ each direction) and the augmented view made on the device
   (`augment.ROID_AUGMENT`: colour, reflect-padded affine, flip; no blur/noise, as the reference);
4. one optimizer step, then weight ensembling θ ← 0.99·θ + 0.01·θ_src on the adapted parameters;
5. prior correction of the returned prediction: prior = the batch's mean softmax, smoothed
   (prior + s) / (1 + s·C) with s = max(1/N, 1/C) / max(prior); corrected probabilities ∝ softmax ⊙
   smoothed prior, returned as logits + log(smoothed prior). The reference returns `logits × prior`
   (a product on the logits); the probability form is the paper's definition and keeps the argmax
   meaningful for negative logits.

The augmented view is forwarded for the kept samples only (as the reference, so BatchNorm statistics of
that forward are the kept samples'): selecting them is the step's one host sync. The source weights stay
on the device (the reference keeps a CPU copy and ensembles across devices every step, which is what
makes it slow)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from app.contract.catalog.tta import ROIDParams

from ._tta import NormAffineMethod, ema_update_, symmetric_cross_entropy
from .augment import ROID_AUGMENT, BatchAugment
from .base import StepOutput, softmax_entropy
from .norm import has_batch_norm
from .registry import implements

SLR_CLIP, SLR_EPS = 0.99, 1e-5


def soft_likelihood_ratio(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.float().softmax(1).clamp(0.0, SLR_CLIP)
    return -(probs * torch.log(probs / (1.0 - probs) + SLR_EPS)).sum(1)


def _minmax(v: torch.Tensor) -> torch.Tensor:
    lo = v.amin()
    return (v - lo) / (v.amax() - lo).clamp_min(1e-12)


def prior_corrected(logits: torch.Tensor) -> torch.Tensor:
    n, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1.0 / n, 1.0 / c) / prior.amax()
    smoothed = (prior + smooth) / (1 + smooth * c)
    return logits + smoothed.log()


@implements(ROIDParams)
class ROID(NormAffineMethod):
    dynamic_shapes = True  # the consistency loss runs on the kept subset, whose size varies
    state_attrs = ("probs_ema",)

    def configure(self) -> None:
        super().configure()
        self.source_params = [q.detach().clone() for q in self.norm_params]
        c = self.ctx.num_classes
        self.probs_ema = torch.full((c,), 1.0 / c, device=self.ctx.device)
        self.augment = BatchAugment(replace(ROID_AUGMENT, hflip=0.5 if self.params.hflip else 0.0),
                                    self.ctx.input_mean, self.ctx.input_std)
        self.kept_total = torch.zeros((), device=self.ctx.device)
        self.seen_total = 0
        # BatchNorm cannot normalise a single kept sample with batch statistics (BatchNorm1d, or a 1×1
        # feature map): then the batch gets no consistency term
        self.min_kept = 2 if has_batch_norm(self.model) else 1

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        n = x.shape[0]
        with self.ctx.autocast():
            logits = self.model(x)
        logits = logits.float()
        probs = logits.softmax(1)
        with torch.no_grad():
            if p.use_weighting:
                div = _minmax(1 - F.cosine_similarity(self.probs_ema.unsqueeze(0), probs, dim=1))
                keep = div >= div.mean()
                cert = _minmax(-softmax_entropy(logits))
                weights = torch.exp(div * cert / p.temperature) * keep
            else:
                keep = torch.ones(n, dtype=torch.bool, device=x.device)
                weights = torch.ones(n, device=x.device)
            self.probs_ema = p.momentum_probs * self.probs_ema + (1 - p.momentum_probs) * probs.detach().mean(0)
        loss_slr = (soft_likelihood_ratio(logits) * weights).sum() / n
        loss = loss_slr
        logs = {"kept": keep.float().sum(), "loss_consistency": torch.zeros((), device=x.device)}
        if p.use_consistency:
            idx = keep.nonzero().squeeze(1)  # the step's host sync
            if idx.numel() >= self.min_kept:
                with self.ctx.autocast():
                    aug_logits = self.model(self.augment(x[idx]))
                cons = (symmetric_cross_entropy(aug_logits, logits[idx]) * weights[idx]).sum() / n
                loss = loss + cons
                logs["loss_consistency"] = cons.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update_(self.norm_params, self.source_params, p.momentum_src)
        self.kept_total += logs["kept"]
        self.seen_total += n
        logs["loss_slr"] = loss_slr.detach()
        out = prior_corrected(logits.detach()) if p.use_prior_correction else logits.detach()
        return StepOutput(out, loss.detach(), logs)

    def report(self) -> dict[str, Any]:
        return {"images_seen": self.seen_total, "samples_kept": int(self.kept_total.item())}
