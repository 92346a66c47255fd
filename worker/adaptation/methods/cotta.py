"""CoTTA (Wang et al., CVPR 2022): continual test-time adaptation with a mean teacher.

Three copies of the network: the student (all weights trained), an EMA teacher (momentum 0.999) and a
frozen anchor (the source model). Per batch:
1. anchor confidence = mean over the batch of the source model's max softmax probability;
2. teacher prediction = the teacher's logits on the batch, or, when the anchor confidence is below
   `ap`, the mean of its logits over `n_augmentations` augmented views of the batch;
3. student loss = cross-entropy from the teacher's softmax (CIFAR; "symmetric" for the reference's
   ImageNet variant); one optimizer step;
4. teacher ← EMA of the student; each weight element of the student is reset to its source value with
   probability `restore_prob` (stochastic restore).
The returned prediction (for segmentation without the averaging, below), and the exported model, are
the teacher's.

The augmented views are made in one batched call per chunk (`augment.BatchAugment`: per-image random
colour, affine, blur, flip and noise on the device) and forwarded through the teacher a chunk of views at
a time (at most `AUG_FORWARD_IMAGES` images per forward; one view per forward on a CPU); the reference
instead runs 32 sequential torchvision pipelines. With BatchNorm, statistics are computed over each
chunk of views rather than per view (both are batches of independently augmented images).

One host sync per step: the branch on the anchor confidence (skipping 32 forwards is worth it).

Segmentation (the authors' Cityscapes -> ACDC variant, as in mariodoebler/test-time-adaptation's
`segmentation/methods/cotta.py`): confidence and loss per pixel; the teacher's augmented prediction is its
logits on the input plus on one view per `scales` entry (resized bilinearly to that fraction of the input,
each image flipped with probability 0.5), each resized back and unflipped, averaged over 1 + len(scales). The
views are 0.25-0.875 of the input, as the reference's (its ratios 0.5-1.75 times half its input crop: "2.0
corresponds to the original test size"), so they cost about a quarter of the input's forward each; the
averaged logits are the student's target only: the returned prediction is the teacher's plain logits on the
input, as the reference returns `model_ema(x)`. The optimizer gives the head (`_seg.head_parameters`)
head_lr_scale x lr. Differences from the reference:
the student learns on the whole batch (the reference adapts on two random 1024x512 crops of each image,
batch size 1, and predicts after the update); view sizes are rounded to a multiple of 8 so strided
encoder/decoder networks (a UNet's skips) line up."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from app.contract.catalog.tta import CoTTAParams

from ._seg import head_parameters
from ._tta import ema_update_, frozen_copy
from .augment import COTTA_AUGMENT, BatchAugment
from .base import Method, StepOutput, make_optimizer
from .norm import use_batch_statistics
from .registry import implements

AUG_FORWARD_IMAGES = 2048  # at most this many augmented images per teacher forward on an accelerator
# On a CPU one view (a batch) per forward, as the reference does: its activations stay in cache, while
# a forward of many views streams every layer's activations through memory (measured: 32 views of 32
# images through a WRN-10-1 took 1.4x the CPU time as one forward; benchmarks/engine_vs_reference.py).


@implements(CoTTAParams)
class CoTTA(Method):
    state_attrs = ("teacher",)

    def configure(self) -> None:
        use_batch_statistics(self.model)
        for q in self.model.parameters():
            q.requires_grad_(True)
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)
        self.student_params = list(self.model.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.source_params = [q.detach().clone() for q in self.student_params]
        self.augment = BatchAugment(replace(COTTA_AUGMENT, hflip=0.5 if self.params.hflip else 0.0),
                                    self.ctx.input_mean, self.ctx.input_std)
        self.augmented_batches = torch.zeros((), device=self.ctx.device)
        self.batches = 0

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return self.student_params

    def build_optimizer(self, params):
        p = self.params
        opt = make_optimizer(params, p.optimizer, p.lr, p.momentum, p.weight_decay, nesterov=p.nesterov)
        if p.head_lr_scale != 1.0 and self.ctx.task == "segmentation":
            head = {id(q) for q in head_parameters(self.model, self.ctx.num_classes)}
            opt.param_groups[0]["params"] = [q for q in params if id(q) not in head]
            opt.add_param_group({"params": [q for q in params if id(q) in head], "lr": p.head_lr_scale * p.lr})
        return opt

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the student's target, the prediction returned, 1.0 if the target is averaged over augmented views
        else 0.0), logits in fp32. The views are averaged when the anchor (source) model's mean confidence is
        below `ap`; classification returns that average, segmentation the teacher's plain logits (the
        reference returns `model_ema(x)`)."""
        with self.ctx.autocast():
            anchor_conf = self.anchor(x).float().softmax(1).amax(1).mean()
            standard = self.teacher(x).float()
        if not bool(anchor_conf < self.params.ap):  # the step's one host sync
            return standard, standard, torch.zeros((), device=x.device)
        if self.ctx.task == "segmentation":
            return self._scaled_views_mean(x, standard), standard, torch.ones((), device=x.device)
        averaged = self._augmented_mean(x, standard)
        return averaged, averaged, torch.ones((), device=x.device)

    def _scaled_views_mean(self, x: torch.Tensor, standard: torch.Tensor) -> torch.Tensor:
        """The teacher's logits N×K×H×W averaged over x (`standard`) and one randomly flipped view per scale."""
        p = self.params
        h, w = x.shape[-2:]
        total = standard.clone()
        for ratio in p.scales:
            flip = (torch.rand(len(x), device=x.device) < 0.5 if p.hflip
                    else torch.zeros(len(x), dtype=torch.bool, device=x.device)).view(-1, 1, 1, 1)
            view = torch.where(flip, x.flip(3), x)
            size = (max(8, round(ratio * h / 8) * 8), max(8, round(ratio * w / 8) * 8))
            view = F.interpolate(view, size=size, mode="bilinear", align_corners=True)
            with self.ctx.autocast():
                out = self.teacher(view).float()
            out = torch.where(flip, out.flip(3), out)
            total += F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return total / (len(p.scales) + 1)

    def _augmented_mean(self, x: torch.Tensor, standard: torch.Tensor) -> torch.Tensor:
        """The teacher's logits averaged over `n_augmentations` augmented views of x (not x itself)."""
        p = self.params
        n = x.shape[0]
        per_chunk = 1 if x.device.type == "cpu" else max(1, AUG_FORWARD_IMAGES // n)
        total = torch.zeros_like(standard)
        done = 0
        while done < p.n_augmentations:
            k = min(per_chunk, p.n_augmentations - done)
            views = self.augment.views(x, k)
            with self.ctx.autocast():
                out = self.teacher(views).float()
            total += out.view(k, n, -1).sum(0)
            done += k
        return total / p.n_augmentations

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        with self.ctx.autocast():
            student = self.model(x)
        student = student.float()
        teacher, returned, augmented = self.teacher_logits(x)
        target = teacher.softmax(1)
        loss = -(target * student.log_softmax(1)).sum(1)
        if p.loss == "symmetric":
            loss = 0.5 * loss - 0.5 * (student.softmax(1) * teacher.log_softmax(1)).sum(1)
        loss = loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            ema_update_(self.teacher_params, self.student_params, p.teacher_momentum)
            if p.restore_prob > 0:
                for q, src in zip(self.student_params, self.source_params):
                    q.copy_(torch.where(torch.rand_like(q) < p.restore_prob, src, q))
        self.augmented_batches += augmented
        self.batches += 1
        return StepOutput(returned, loss.detach(), {"augmented": augmented})

    def export_model(self) -> torch.nn.Module:
        return self.teacher

    def report(self) -> dict[str, Any]:
        return {"batches": self.batches, "augmentation_averaged_batches": int(self.augmented_batches.item())}
