"""Shared by the source-free domain adaptation methods (shot, shot_im, nrc, aad): what they update (the
feature extractor; the classifier stays frozen), the authors' SGD schedule, passes over the whole
target set, and the extra state (step counter, pseudo-labels, memory banks) that snapshot/restore carry.

Not a method: `_load_all` skips modules whose name starts with an underscore."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdaptationError
from ..models.registry import classifier_of, forward_features
from .base import Method, make_optimizer
from .norm import use_batch_statistics

BOTTLENECK_NAME = "bottleneck"  # built-in digit models: backbone -> bottleneck -> classifier


def entropy_eps(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample entropy as the reference computes it: -sum p log(p + eps)."""
    return -(probs * torch.log(probs + eps)).sum(1)


def information_maximisation(probs: torch.Tensor, eps: float, diversity: bool = True) -> torch.Tensor:
    """SHOT's IM loss: mean per-sample entropy minus the entropy of the mean prediction."""
    loss = entropy_eps(probs, eps).mean()
    if diversity:
        mean = probs.mean(0)
        loss = loss + (mean * torch.log(mean + eps)).sum()
    return loss


class SFDAMethod(Method):
    """Trains everything but the classifier in train mode (batch statistics, dropout on), as the
    reference scripts do; whole-target passes (pseudo-labels, banks) run with dropout off and batch
    statistics (see `target_pass`)."""

    state_attrs = ("iteration",)  # subclasses add theirs (pseudo-labels, memory banks)

    def __init__(self, model: nn.Module, params, ctx):
        for name in self.declared_state():
            setattr(self, name, None)
        self.iteration = 0
        super().__init__(model, params, ctx)

    # --- hooks -----------------------------------------------------------------------------------
    def check_compatible(self) -> None:
        super().check_compatible()
        if self.ctx.iterate_target is None:
            raise AdaptationError("internal", f"{self.name} needs passes over the whole target set")
        try:
            classifier_of(self.model)
        except ValueError:
            raise AdaptationError("no_classifier", f"{self.name} freezes the final nn.Linear classifier and "
                                  "adapts the layers before it; the model has no nn.Linear") from None

    def configure(self) -> None:
        classifier = classifier_of(self.model)
        frozen = {id(p) for p in classifier.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        self.model.train()

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        keep = {id(q) for q in params}
        bottleneck = getattr(self.model, "bottleneck_name", BOTTLENECK_NAME)
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "bottleneck": []}
        for name, q in self.model.named_parameters():
            if id(q) in keep:
                head = name == bottleneck or name.startswith(bottleneck + ".")
                groups["bottleneck" if head else "backbone"].append(q)
        # No bottleneck: every weight is backbone, at lr × backbone_lr_mult (on a ResNet-18 at 1e-3 × 0.1
        # the weights barely moved, BN-1's accuracy; BENCHMARKS.md, issue 16).
        param_groups = [{"params": groups["backbone"], "lr": p.lr * p.backbone_lr_mult},
                        {"params": groups["bottleneck"], "lr": p.lr}]
        param_groups = [g for g in param_groups if g["params"] and g["lr"] > 0]
        for g in param_groups:
            g["lr0"] = g["lr"]
        if not param_groups:
            raise AdaptationError("nothing_to_adapt", f"{self.name}: no weight gets a non-zero learning rate")
        return make_optimizer(param_groups, "sgd", p.lr, p.momentum, p.weight_decay, p.nesterov)

    # --- schedule ----------------------------------------------------------------------------------
    @property
    def max_iterations(self) -> int:
        return max(1, self.ctx.epochs * math.ceil(self.ctx.dataset_size / self.ctx.batch_size))

    def advance_schedule(self) -> None:
        """One more step: the reference's lr_t = lr0 (1 + 10 t/T)^-0.75, t counted from 1."""
        self.iteration += 1
        if self.params.lr_decay:
            decay = (1 + 10 * self.iteration / self.max_iterations) ** -0.75
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr0"] * decay

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    # --- forward passes ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) in float32; the forward itself runs under the job's autocast."""
        with self.ctx.autocast():
            feats, logits = forward_features(self.model, x)
        return feats.float(), logits.float()

    def too_small(self, x: torch.Tensor) -> bool:
        """A batch of one image (the last one): predicted in eval mode, not trained on (the reference
        skips such batches; its batch losses need two samples)."""
        return x.shape[0] < 2

    @torch.no_grad()
    def target_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits (float32, on the device) of the whole target set, dropout off, indexed by
        dataset index. BatchNorm normalises with each batch's statistics, as in the training steps.

        The authors' scripts run this pass in eval mode, with the source's running statistics. On a shift
        that moves the input statistics that model predicts one class for nearly every image (MNIST-C fog:
        10 % accuracy in eval mode, 40 % with batch statistics), and NRC/AaD's first-epoch neighbours
        and SHOT's first pseudo-labels would start from it."""
        feats = logits = None
        try:
            for x, idx in self.ctx.iterate_target():
                if x.shape[0] > 1:
                    use_batch_statistics(self.model)
                else:  # a batch of one has no batch statistics: the running ones
                    self.model.eval()
                f, z = self.forward(x)
                if feats is None:
                    n = self.ctx.dataset_size
                    feats = f.new_zeros(n, f.shape[1])
                    logits = z.new_zeros(n, z.shape[1])
                feats[idx] = f
                logits[idx] = z
        finally:
            self.model.train()
        return feats, logits

    def report(self) -> dict[str, Any]:
        return {"optimizer_steps": self.iteration, "skipped_batches_of_one": self.skipped_batches,
                "final_lr": [g["lr"] for g in self.optimizer.param_groups]}

    # --- state ----------------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if self.optimizer is not None and self.params.lr_decay:
            # the lr the restored step counter implies (the optimizer state may predate it)
            decay = (1 + 10 * self.iteration / self.max_iterations) ** -0.75
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr0"] * decay


class NeighbourhoodMethod(SFDAMethod):
    """NRC and AaD: a bank of L2-normalised features and one of softmax scores over the whole target
    set, filled by a whole-target pass (`target_pass`) before the first epoch and refreshed with each
    training batch."""

    state_attrs = ("feature_bank", "score_bank")

    def neighbours(self) -> int:
        """The most nearest neighbours a sample looks up (the target set needs one image more)."""
        raise NotImplementedError

    def check_compatible(self) -> None:
        super().check_compatible()
        needed = self.neighbours() + 1
        if self.ctx.dataset_size < needed:
            raise AdaptationError("dataset_too_small",
                                  f"{self.name} needs at least {needed} target images "
                                  "(its neighbourhoods exclude the sample itself)",
                                  {"dataset_size": self.ctx.dataset_size})

    def begin_epoch(self, epoch: int) -> None:
        self.ensure_banks()

    def ensure_banks(self) -> None:
        """Fill the banks from a pass over the target set, unless they hold something (they may have
        been emptied by a restore to a state from before the first epoch: the collapse guard's)."""
        if self.feature_bank is None:
            feats, logits = self.target_pass()
            self.feature_bank = F.normalize(feats, dim=1)
            self.score_bank = logits.softmax(1)

    def forward_into_banks(self, x: torch.Tensor, index: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training step's start: the banks filled, the schedule advanced, the batch forwarded and written
        into the banks. Returns (logits, softmax, the batch's normalised features)."""
        self.ensure_banks()
        self.advance_schedule()
        feats, logits = self.forward(x)
        probs = logits.softmax(1)
        return logits, probs, self.refresh_banks(feats, probs, index)

    @torch.no_grad()
    def refresh_banks(self, feats: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Write this batch into the banks; returns its normalised features."""
        normed = F.normalize(feats.detach(), dim=1)
        self.feature_bank[index] = normed
        self.score_bank[index] = probs.detach()
        return normed

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k nearest bank entries of each query (cosine similarity), the query's own
        entry (the most similar, it was just written) left out. queries: (..., D) -> (..., k)."""
        sim = queries @ self.feature_bank.T
        k = min(k, self.feature_bank.shape[0] - 1)
        return sim.topk(k + 1, dim=-1).indices[..., 1:]
