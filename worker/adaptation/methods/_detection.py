"""What the detection self-training methods share (catalog/detection.py describes them): views, pseudo-labels
and one training step of a torchvision detector on them with the detector's own losses.

A detector in train mode takes (images, targets) and returns its loss dict; in eval mode it returns one
detection dict per image. Inputs are [0, 1] pixels (the detection preprocess is the identity), so the
augmentations work on them directly. They are photometric, plus a horizontal flip applied to the image and
its pseudo-boxes alike (weak view): boxes never need another transform."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import boxes as B
from ..models.export import recalibrate_batch_norm
from ..models.torchvision_det import freeze_bn, unfreeze_bn
from ..tasks.detection import CONFIDENT
from .base import Method, StepOutput, make_optimizer


# --- views ---------------------------------------------------------------------------------------

def flip_mask(n: int, enabled: bool, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, device=device) < 0.5) if enabled else torch.zeros(n, dtype=torch.bool, device=device)


def flip_images(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None, None], x.flip(-1), x) if mask.any() else x


def flip_boxes(dets: list[dict], mask: torch.Tensor, width: int) -> list[dict]:
    out = []
    for d, m in zip(dets, mask.tolist()):
        if m and len(d["boxes"]):
            b = d["boxes"]
            d = {**d, "boxes": torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)}
        out.append(d)
    return out


@torch.no_grad()
def strong_view(x: torch.Tensor) -> torch.Tensor:
    """Unbiased Teacher's strong augmentation, per image, batched: colour jitter (brightness, contrast,
    saturation 0.4, p 0.8), grayscale (p 0.2), Gaussian blur (σ 0.1–2, p 0.5), then random erasing three
    times (p 0.7 scale 0.05–0.2; p 0.5 and p 0.3 scale 0.02–0.2), erased pixels set to random values."""
    n, c, h, w = x.shape
    dev = x.device

    def per_image(lo, hi):
        return (torch.rand(n, 1, 1, 1, device=dev) * (hi - lo) + lo)

    jitter = torch.rand(n, 1, 1, 1, device=dev) < 0.8
    y = x * torch.where(jitter, per_image(0.6, 1.4), torch.ones_like(per_image(0, 1)))
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = torch.where(jitter, (y - mean) * per_image(0.6, 1.4) + mean, y)
    if c == 3:
        grey = (y * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        y = torch.where(jitter, (y - grey) * per_image(0.6, 1.4) + grey, y)
        to_grey = torch.rand(n, 1, 1, 1, device=dev) < 0.2
        grey = (y * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        y = torch.where(to_grey, grey.expand_as(y), y)
    y = y.clamp(0, 1)
    blur = torch.rand(n, device=dev) < 0.5
    if blur.any():
        sigma = torch.rand(n, device=dev) * 1.9 + 0.1
        k = torch.arange(-3, 4, device=dev, dtype=y.dtype)
        kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)                                  # n×7
        weight = kern.repeat_interleave(c, 0)                                      # (n·c)×7
        flat = y.reshape(1, n * c, h, w)
        blurred = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), weight.view(n * c, 1, 1, 7), groups=n * c)
        blurred = F.conv2d(F.pad(blurred, (0, 0, 3, 3), mode="replicate"), weight.view(n * c, 1, 7, 1), groups=n * c)
        y = torch.where(blur[:, None, None, None], blurred.view(n, c, h, w), y)
    for p, lo in ((0.7, 0.05), (0.5, 0.02), (0.3, 0.02)):
        y = _erase(y, p, (lo, 0.2))
    return y


def _erase(y: torch.Tensor, p: float, scale: tuple[float, float]) -> torch.Tensor:
    n, c, h, w = y.shape
    dev = y.device
    area = (torch.rand(n, device=dev) * (scale[1] - scale[0]) + scale[0]) * h * w
    ratio = torch.exp(torch.rand(n, device=dev) * (torch.log(torch.tensor(3.3)) - torch.log(torch.tensor(0.3)))
                      + torch.log(torch.tensor(0.3)))
    eh = (area * ratio).sqrt().clamp(1, h)
    ew = (area / ratio).sqrt().clamp(1, w)
    top = torch.rand(n, device=dev) * (h - eh)
    left = torch.rand(n, device=dev) * (w - ew)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    apply = (torch.rand(n, device=dev) < p).view(n, 1, 1)
    return torch.where((inside & apply)[:, None], torch.rand_like(y), y)


# --- pseudo-labels and training ----------------------------------------------------------------------

def pseudo_labels(dets: list[dict], threshold: float) -> list[dict]:
    """Detections with score ≥ threshold and a positive size, as training targets."""
    out = []
    for d in dets:
        t = B.filter_pseudo_labels(d, threshold)
        b = t["boxes"]
        keep = ((b[:, 2] - b[:, 0]) > 1e-3) & ((b[:, 3] - b[:, 1]) > 1e-3)
        out.append({"boxes": b[keep].float(), "labels": t["labels"][keep].long()})
    return out


@torch.no_grad()
def detect(model: nn.Module, x: torch.Tensor, autocast) -> list[dict]:
    """The model's eval-mode detections (modes restored after)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with autocast():
            out = model(x)
    finally:
        for m, t in modes.items():
            m.train(t)
    return [{k: v.float() if k != "labels" else v for k, v in o.items()} for o in out]


def detection_loss(model: nn.Module, x: torch.Tensor, targets: list[dict], autocast) -> dict[str, torch.Tensor]:
    """The detector's own training losses on (x, targets); the model is in train mode only meanwhile
    (FrozenBatchNorm2d stays frozen; live BatchNorm2d layers, e.g. SSDlite's, use batch statistics)."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        with autocast():
            losses = model(x, targets)
    finally:
        for m, t in modes.items():
            m.train(t)
    return {k: v.float() for k, v in losses.items()}


class SelfTraining(Method):
    """A student detector trained on pseudo-labels (every weight, SGD); subclasses say where the
    pseudo-labels come from (`targets_for`) and may add losses (`extra_loss`)."""

    # FrozenBatchNorm2d detectors do not need batch statistics; SSDlite (live BatchNorm) does, which
    # Method's checks on has_batch_norm cover.

    def configure(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.pseudo_label_counts: list[float] = []
        self.prepared = False
        self.bn_batches = 0

    def begin_epoch(self, epoch: int) -> None:
        if not self.prepared:  # once, before the first step
            self.prepared = True
            if self.params.adapt_batch_norm:
                self.adapt_batch_norm()
            self.prepare()

    @torch.no_grad()
    def adapt_batch_norm(self) -> None:
        """AdaBN of the frozen statistics (and of live BatchNorm layers, SSDlite's), frozen again after;
        FrozenBatchNorm2d has no parameters, so the optimizer is unaffected."""
        unfreeze_bn(self.model)
        self.bn_batches = recalibrate_batch_norm(self.model, (x for x, _ in self.ctx.iterate_target()),
                                                 self.ctx.autocast)
        freeze_bn(self.model, only_marked=True)

    def prepare(self) -> None:
        """Work before the first step, after the optional BatchNorm adaptation (pseudo-labels, splits)."""

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        return make_optimizer(params + self.extra_params(), "sgd", p.lr, p.momentum, p.weight_decay)

    def extra_params(self) -> list[nn.Parameter]:
        return []

    def targets_for(self, x_weak: torch.Tensor, index: torch.Tensor, flipped: torch.Tensor) -> tuple[list[dict], list[dict]]:
        """(pseudo-labels in the weak view's frame, detections of the exported model on the unflipped batch)."""
        raise NotImplementedError

    def extra_loss(self, index: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        return None, {}

    def after_step(self) -> None:
        pass

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        flipped = flip_mask(x.shape[0], self.params.flip, x.device)
        x_weak = flip_images(x, flipped)
        targets, online = self.targets_for(x_weak, index, flipped)
        x_student = strong_view(x_weak) if self.params.strong_augment else x_weak
        losses = detection_loss(self.model, x_student, targets, self.ctx.autocast)
        loss = sum(losses.values())
        extra, extra_logs = self.extra_loss(index)
        if extra is not None:
            loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.after_step()
        kept = sum(len(t["labels"]) for t in targets)
        self.pseudo_label_counts.append(kept / max(len(targets), 1))
        logs = {"pseudo_labels_per_image": torch.tensor(kept / max(len(targets), 1)),
                **{f"loss_{k}": v.detach() for k, v in losses.items()}, **extra_logs}
        return StepOutput(online, loss.detach(), logs)

    def report(self) -> dict[str, Any]:
        counts = self.pseudo_label_counts
        return {"pseudo_labels_per_image_mean": sum(counts) / len(counts) if counts else 0.0,
                "steps": len(counts), "batchnorm_adapted_batches": self.bn_batches}


class MeanTeacherBase(SelfTraining):
    """The EMA teacher labels the weak view; exported: the teacher."""

    state_attrs = ("teacher",)

    def configure(self) -> None:
        super().configure()
        self.teacher = copy.deepcopy(self.model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.agreements: list[float] = []

    def adapt_batch_norm(self) -> None:
        super().adapt_batch_norm()
        self.teacher.load_state_dict(self.model.state_dict())

    def targets_for(self, x_weak, index, flipped):
        dets = detect(self.teacher, x_weak, self.ctx.autocast)
        return pseudo_labels(dets, self.params.score_threshold), flip_boxes(dets, flipped, x_weak.shape[-1])

    @torch.no_grad()
    def after_step(self) -> None:
        keep = self.params.ema_keep
        student = self.model.state_dict()
        for name, t in self.teacher.state_dict().items():
            s = student[name]
            if t.dtype.is_floating_point:
                t.mul_(keep).add_(s.detach(), alpha=1 - keep)
            else:
                t.copy_(s)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        out = super().step(x, index)
        # teacher–student agreement on the batch (confident detections matched by label and IoU ≥ 0.5)
        student = detect(self.model, x, self.ctx.autocast)
        agreement = B.agreement(student, [{k: v.detach() for k, v in o.items()} for o in out.logits], CONFIDENT)
        self.agreements.append(agreement)
        out.logs["teacher_student_agreement"] = torch.tensor(agreement)
        return out

    def export_model(self) -> nn.Module:
        return self.teacher

    def report(self) -> dict[str, Any]:
        a = self.agreements
        return {**super().report(), "teacher_student_agreement_last": a[-1] if a else None,
                "teacher_student_agreement_mean": sum(a) / len(a) if a else None}
