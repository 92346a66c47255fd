"""`titan`: TITAN's variance split and easy/hard adversarial alignment on a mean teacher
(catalog/detection.py says what it follows and what differs on CNN detectors).

1. Before the first epoch: M passes of the source detector with dropout on its backbone's feature maps
   (Monte-Carlo dropout; torchvision's detectors have none of their own). Per image, the reference
   detections are the deterministic pass's with score ≥ VARIANCE_SCORE; in each stochastic pass every
   reference box is matched to the pass's best-overlapping box (IoU ≥ 0.5; unmatched: the reference box
   and score 0). v_box = mean squared deviation of the matched boxes (xyxy divided by the image's width and
   height) from their mean, v_score the same for scores, v = v_box · v_score; an image without reference
   detections has v = 0. Ranked by v (ascending, rank r = 1..N), images with r/N ≥ σ are easy.
2. Training: the mean teacher, plus λ · BCE of a discriminator that tells easy (1) from hard (0) images
   from the student's pooled backbone features (global average of each FPN level, concatenated), behind a
   gradient-reversal layer: the discriminator learns the split, the backbone learns to erase it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.contract.catalog.detection import TitanParams

from ._detection import MeanTeacherBase, detect
from .registry import implements

VARIANCE_SCORE = 0.3   # reference detections of the variance estimate: deterministic pass, score ≥ this
MATCH_IOU = 0.5


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient: float):
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def pooled(features) -> torch.Tensor:
    """A backbone's output (a tensor or an OrderedDict of FPN maps) -> N × (C·levels) global averages."""
    maps = list(features.values()) if isinstance(features, dict) else [features]
    return torch.cat([m.float().mean(dim=(2, 3)) for m in maps], 1)


class _FeatureDropout:
    """A forward hook on the backbone: dropout on every feature map it returns (MC passes only)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, _module, _inputs, out):
        if isinstance(out, dict):
            return type(out)((k, F.dropout(v, self.p, training=True)) for k, v in out.items())
        return F.dropout(out, self.p, training=True)


@implements(TitanParams)
class Titan(MeanTeacherBase):
    state_attrs = ("discriminator",)

    def configure(self) -> None:
        super().configure()
        with torch.no_grad():
            probe = self.model.backbone(torch.zeros(1, 3, 256, 256, device=self.ctx.device))
        dim = pooled(probe).shape[1]
        self.discriminator = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(inplace=True), nn.Linear(256, 1)).to(
            self.ctx.device)
        self.easy: torch.Tensor | None = None       # bool per dataset index, fixed by the source model
        self.variance: np.ndarray | None = None
        self._features: list = []
        self.model.backbone.register_forward_hook(lambda _m, _i, out: self._features.append(out))
        self.disc_accuracy: list[float] = []

    def extra_params(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    # --- the split ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> None:
        source = self.teacher  # the source model (BatchNorm-adapted if asked) before the first step
        variances: dict[int, float] = {}
        dropout = source.backbone.register_forward_hook(_FeatureDropout(self.params.mc_dropout))
        try:
            for x, idx in self.ctx.iterate_target():
                dropout.remove()
                reference = detect(source, x, self.ctx.autocast)
                dropout = source.backbone.register_forward_hook(_FeatureDropout(self.params.mc_dropout))
                passes = [detect(source, x, self.ctx.autocast) for _ in range(self.params.mc_passes)]
                h, w = x.shape[-2:]
                for k, i in enumerate(idx.tolist()):
                    variances[i] = image_variance(reference[k], [p[k] for p in passes], w, h)
        finally:
            dropout.remove()
        n = self.ctx.dataset_size
        v = np.array([variances.get(i, 0.0) for i in range(n)])
        ranks = np.empty(n, np.int64)
        ranks[np.argsort(v, kind="stable")] = np.arange(1, n + 1)
        self.variance = v
        self.easy = torch.from_numpy(ranks / n >= self.params.split_quantile).to(self.ctx.device)

    # --- the adversarial term -------------------------------------------------------------------------
    def targets_for(self, x_weak, index, flipped):
        self._features.clear()
        return super().targets_for(x_weak, index, flipped)

    def extra_loss(self, index: torch.Tensor):
        feats = self._features[-1]  # the student's train-mode forward of this step
        self._features.clear()
        z = _ReverseGradient.apply(pooled(feats), self.params.grl_coefficient)
        logits = self.discriminator(z).squeeze(1)
        target = self.easy[index].float()
        loss = F.binary_cross_entropy_with_logits(logits, target)
        accuracy = ((logits > 0).float() == target).float().mean().detach()
        self.disc_accuracy.append(float(accuracy))
        return self.params.adversarial_weight * loss, {"discriminator_loss": loss.detach(),
                                                         "discriminator_accuracy": accuracy,
                                                         "easy_fraction": target.mean()}

    def step(self, x, index):
        out = super().step(x, index)
        self._features.clear()  # the agreement pass's features are not kept
        return out

    # --- records ------------------------------------------------------------------------------------
    def split(self) -> dict[str, Any]:
        if self.variance is None:
            return {}
        v, easy = self.variance, self.easy.cpu().numpy()
        return {"split_quantile": self.params.split_quantile, "easy": int(easy.sum()), "hard": int((~easy).sum()),
                "variance_quantiles": {q: float(np.quantile(v, float(q))) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")},
                "variance_threshold": float(v[easy].min()) if easy.any() else None}

    def history(self) -> dict[str, Any]:
        if self.variance is None:
            return {}
        return {"variance_split": {**self.split(), "per_image_variance": [float(x) for x in self.variance],
                                   "easy": [bool(e) for e in self.easy.cpu().tolist()]}}

    def report(self) -> dict[str, Any]:
        d = self.disc_accuracy
        return {**super().report(), "split": self.split(),
                "discriminator_accuracy_mean": sum(d) / len(d) if d else None}


def image_variance(reference: dict, passes: list[dict], width: int, height: int) -> float:
    """v_box · v_score of one image (see the module's docstring)."""
    from torchvision.ops import box_iou

    ref = reference["boxes"][reference["scores"] >= VARIANCE_SCORE]
    if not len(ref):
        return 0.0
    scale = torch.tensor([width, height, width, height], dtype=ref.dtype, device=ref.device)
    boxes, scores = [], []
    for p in passes:
        if len(p["boxes"]):
            iou = box_iou(ref, p["boxes"])
            best, j = iou.max(1)
            hit = best >= MATCH_IOU
            boxes.append(torch.where(hit[:, None], p["boxes"][j], ref) / scale)
            scores.append(torch.where(hit, p["scores"][j], torch.zeros_like(best)))
        else:
            boxes.append(ref / scale)
            scores.append(torch.zeros(len(ref), device=ref.device))
    b = torch.stack(boxes)            # M × R × 4
    s = torch.stack(scores)           # M × R
    v_box = float(((b - b.mean(0)) ** 2).sum(-1).mean())
    v_score = float(((s - s.mean(0)) ** 2).mean())
    return v_box * v_score
