"""RMT (Döbler, Marsden & Yang, CVPR 2023: robust mean teacher), source-free variant.

The student (all weights) plus a projector MLP (features → projection_dim → projection_dim) learn, per
batch:
- λ_ce_trg × the symmetric cross-entropy between the EMA teacher's logits and the student's logits on
  the batch and on one augmented view of it (¼ of each of the four directions, as the reference);
- λ_cont × a supervised-contrastive loss (SupCon, 'all' anchors, temperature 0.1) over three views per
  sample — its nearest class prototype, its features, its augmented view's features — all projected and
  L2-normalised; a sample's three views are positives of each other, everything else negatives.
Then the teacher ← EMA(0.999) of the student. The prediction is student + teacher logits (reference).

Differences from the reference, which needs labelled source data: no source replay (λ_ce_src), no
warm-up on source images, and no source prototypes. The prototypes here are built from the first
`prototype_batches` target batches: the teacher's features (the teacher starts as the source model and
moves slowly) averaged per predicted class, weighted by the teacher's confidence; they are frozen after
those batches so they stay an anchor, as the source prototypes are. Classes never predicted during those
batches have no prototype and are never chosen as a nearest prototype.

The exported model is the teacher (the reference only defines the ensemble prediction; the teacher is
the stable half of it)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.contract.catalog.tta import RMTParams

from ..errors import AdaptationError
from ..models.registry import classifier_of, forward_features
from ._tta import ema_update_, frozen_copy, tta_optimizer
from .augment import COTTA_AUGMENT, BatchAugment
from .base import Method, StepOutput
from .norm import use_batch_statistics
from .registry import implements


def symmetric_entropy(x: torch.Tensor, x_aug: torch.Tensor, x_ema: torch.Tensor) -> torch.Tensor:
    """Per-sample symmetric cross-entropy of the reference: ¼ of each direction teacher↔student and
    teacher↔augmented student."""
    ema_p, ema_log = x_ema.softmax(1), x_ema.log_softmax(1)
    return -0.25 * ((ema_p * x.log_softmax(1)).sum(1) + (x.softmax(1) * ema_log).sum(1)
                    + (ema_p * x_aug.log_softmax(1)).sum(1) + (x_aug.softmax(1) * ema_log).sum(1))


def supcon_views(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon loss ('all' mode, labels = sample identity) for z of shape (V, N, D), L2-normalised: each
    of the V·N anchors has the V−1 other views of its sample as positives."""
    v, n, _ = z.shape
    flat = z.reshape(v * n, -1)
    logits = flat @ flat.T / temperature
    logits = logits - logits.amax(1, keepdim=True).detach()
    self_mask = torch.eye(v * n, dtype=torch.bool, device=z.device)
    ids = torch.arange(n, device=z.device).repeat(v)
    positives = (ids.unsqueeze(0) == ids.unsqueeze(1)) & ~self_mask
    exp = logits.exp().masked_fill(self_mask, 0.0)
    log_prob = logits - exp.sum(1, keepdim=True).log()
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1)
    return -mean_log_prob_pos.mean()  # temperature / base_temperature = 1 in the reference


@implements(RMTParams)
class RMT(Method):
    state_attrs = ("teacher", "projector", "proto_sum", "proto_weight", "proto_batches")

    def configure(self) -> None:
        use_batch_statistics(self.model)
        for q in self.model.parameters():
            q.requires_grad_(True)
        try:
            head = classifier_of(self.model)
        except ValueError:
            raise AdaptationError("no_classifier", "rmt projects the features entering the final nn.Linear "
                                  "classifier; the model has no nn.Linear") from None
        dim, dev = head.in_features, self.ctx.device
        d = self.params.projection_dim
        self.projector = nn.Sequential(nn.Linear(dim, d), nn.ReLU(), nn.Linear(d, d)).to(dev)
        self.teacher = frozen_copy(self.model)
        self.student_params = list(self.model.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.augment = BatchAugment(replace(COTTA_AUGMENT, hflip=0.5 if self.params.hflip else 0.0),
                                    self.ctx.input_mean, self.ctx.input_std)
        c = self.ctx.num_classes
        self.proto_sum = torch.zeros(c, dim, device=dev)
        self.proto_weight = torch.zeros(c, device=dev)
        self.proto_batches = 0

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return self.student_params + list(self.projector.parameters())

    def build_optimizer(self, params):
        return tta_optimizer(params, self.params)

    def _features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.ctx.autocast():
            feats, logits = forward_features(model, x)
        return feats.float(), logits.float()

    @torch.no_grad()
    def _prototypes(self, feats: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate (while building) and return (prototypes (C, D), valid (C,) bool)."""
        if self.proto_batches < self.params.prototype_batches:
            conf, label = logits.softmax(1).max(1)
            self.proto_sum.index_add_(0, label, feats * conf.unsqueeze(1))
            self.proto_weight.index_add_(0, label, conf)
            self.proto_batches += 1
        return self.proto_sum / self.proto_weight.clamp_min(1e-12).unsqueeze(1), self.proto_weight > 0

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        feats, logits = self._features(self.model, x)
        feats_aug, logits_aug = self._features(self.model, self.augment(x))
        with torch.no_grad():
            t_feats, t_logits = self._features(self.teacher, x)
            protos, valid = self._prototypes(t_feats, t_logits)
            sim = F.normalize(feats.detach(), dim=1) @ F.normalize(protos, dim=1).T
            nearest = sim.masked_fill(~valid.unsqueeze(0), float("-inf")).argmax(1)

        views = torch.stack([protos[nearest], feats, feats_aug])  # (3, N, D)
        with self.ctx.autocast():
            z = self.projector(views)
        z = F.normalize(z.float(), dim=-1)
        loss_cont = supcon_views(z, p.temperature)
        loss_ce = symmetric_entropy(logits, logits_aug, t_logits).mean()
        loss = p.lambda_ce_trg * loss_ce + p.lambda_cont * loss_cont
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update_(self.teacher_params, self.student_params, p.teacher_momentum)
        return StepOutput((logits + t_logits).detach(), loss.detach(),
                          {"loss_ce": loss_ce.detach(), "loss_contrastive": loss_cont.detach()})

    def export_model(self) -> nn.Module:
        return self.teacher

    def report(self) -> dict[str, Any]:
        return {"prototype_batches": self.proto_batches,
                "classes_with_prototype": int((self.proto_weight > 0).sum().item())}
