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
The returned prediction, and the exported model, are the teacher's.

The augmented views are made in one batched call per chunk (`augment.BatchAugment`: per-image random
colour, affine, blur, flip and noise on the device) and forwarded through the teacher a chunk of views at
a time (at most `AUG_FORWARD_IMAGES` images per forward; one view per forward on a CPU); the reference
instead runs 32 sequential torchvision pipelines. With BatchNorm, statistics are computed over each
chunk of views rather than per view (both are batches of independently augmented images).

One host sync per step: the branch on the anchor confidence (skipping 32 forwards is worth it)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from app.contract.catalog.tta import CoTTAParams

from ._tta import ema_update_, frozen_copy, tta_optimizer
from .augment import COTTA_AUGMENT, BatchAugment
from .base import Method, StepOutput
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
        return tta_optimizer(params, self.params)

    @torch.no_grad()
    def teacher_prediction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher logits, 1.0 if they are augmentation-averaged else 0.0), fp32."""
        p = self.params
        with self.ctx.autocast():
            anchor_conf = self.anchor(x).float().softmax(1).amax(1).mean()
            standard = self.teacher(x).float()
        if not bool(anchor_conf < p.ap):  # the step's one host sync
            return standard, torch.zeros((), device=x.device)
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
        return total / p.n_augmentations, torch.ones((), device=x.device)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        with self.ctx.autocast():
            student = self.model(x)
        student = student.float()
        teacher, augmented = self.teacher_prediction(x)
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
        return StepOutput(teacher, loss.detach(), {"augmented": augmented})

    def export_model(self) -> torch.nn.Module:
        return self.teacher

    def report(self) -> dict[str, Any]:
        return {"batches": self.batches, "augmentation_averaged_batches": int(self.augmented_batches.item())}
