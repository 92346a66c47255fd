"""Multi-source distillation into one small student (Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314):
DistillNearest distils the single source most similar to the target task; DistillWeighted distils every
source, each weighted by its similarity (`transferability`). Pure torch: the caller provides the source
models' outputs on the target, batches of target images and the optional small labelled target set.

What the paper's text that could be read here fixes (its abstract, and the ICLR 2023 submission's,
"Learning Efficient Models From Few Labels By Distillation From Multiple Tasks"): semi-supervised
cross-domain distillation from diverse source models into one efficient model, no source data, "merely
features and pseudo-labels of the source models", a few labelled target images plus unlabelled ones,
DistillWeighted's sources "weighted by their relevance for the target task". Its method section could not
be read from this environment (see `transferability`), so the losses below are this implementation's,
each measured in BENCHMARKS.md ("Several source models"), none checked against the authors' equations.

Losses per step (unlabelled target batch U, labelled batch L):
    feature_weight · Σ_s w_s ‖norm(P_s f(U)) − norm(φ_s(U))‖²      feature distillation: a linear projection
                                                                   P_s per source maps the student's features
                                                                   onto source s's (any label space, any width)
  + CE(g(L), y_L)                                                  the few labels, when given
  + pseudo_label_weight · Σ_s w_s τ² KL(softmax(z_s(U)/τ) ‖ softmax(H_s f(U)/τ))
                                                                   pseudo-label distillation: a linear head H_s
                                                                   per source on the student's features predicts
                                                                   source s's soft pseudo-labels over source s's
                                                                   own classes (any label space; the form of
                                                                   Phoo & Hariharan's STARTUP, ICLR 2021). Off
                                                                   by default (BENCHMARKS.md)
  + kd_weight · Σ_s w_s τ² KL(softmax(z_s(U)/τ) ‖ softmax(g(U)/τ))  optional logit distillation into the
                                                                   student's own classifier g (off by default),
                                                                   only for sources whose classes are the target's
Source outputs are computed once, in eval mode, on un-augmented target images and cached: one teacher
forward per image instead of one per epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .methods.base import make_optimizer
from .models.registry import forward_features

Batches = Callable[[np.ndarray | None], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class DistillConfig:
    """Training settings: the method's catalogue params (app/contract/catalog/multimodel.py, where the
    defaults and their meaning live) plus the job's epochs and seed."""

    epochs: int
    seed: int
    lr: float
    weight_decay: float
    feature_weight: float
    kd_weight: float
    pseudo_label_weight: float
    kd_temperature: float
    labelled_batch_size: int
    labelled_shift: int

    @classmethod
    def from_params(cls, params: dict, epochs: int, seed: int) -> "DistillConfig":
        names = {f for f in cls.__dataclass_fields__} - {"epochs", "seed"}
        return cls(epochs=epochs, seed=seed, **{k: params[k] for k in names})


@dataclass
class SourceOutputs:
    """One source model's outputs on the whole target set, in stored order (CPU, float32)."""

    features: torch.Tensor             # N × d_s, the input of its classifier
    logits: torch.Tensor | None        # N × C_s over its own classes (None: not kept)
    same_label_space: bool = True      # its classes are the target's

    @property
    def probs(self) -> torch.Tensor | None:
        """Its predictions over the target's classes; None when its classes are others."""
        return None if self.logits is None or not self.same_label_space else self.logits.softmax(1)


@torch.no_grad()
def source_outputs(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   same_label_space: bool) -> SourceOutputs:
    """Features and logits of `model` in eval mode over every batch (its BatchNorm statistics as uploaded)."""
    was = model.training
    model.eval()
    feats, logits = [], []
    for x, _ in batches:
        f, z = forward_features(model, x)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    model.train(was)
    return SourceOutputs(torch.cat(feats), torch.cat(logits), same_label_space)


def nearest_weights(scores: list[float]) -> torch.Tensor:
    """DistillNearest: all the weight on the most similar source (the first one on ties)."""
    w = torch.zeros(len(scores))
    w[int(np.argmax(scores))] = 1.0
    return w


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over the batch (Hinton et al.'s scaling)."""
    p = F.softmax(teacher_logits.float() / tau, 1)
    return tau * tau * F.kl_div(F.log_softmax(student_logits.float() / tau, 1), p, reduction="batchmean")


def distillation_losses(student_features: torch.Tensor, student_logits: torch.Tensor, index: torch.Tensor,
                        sources: list[SourceOutputs], weights: torch.Tensor, projections: nn.ModuleList,
                        heads: nn.ModuleList, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature loss, logit loss, pseudo-label loss) of one unlabelled batch, each a weight-sum over the
    sources. `heads[s]` is source s's pseudo-label head (an nn.Identity when that loss is off)."""
    dev = student_features.device
    feat = student_features.new_zeros(())
    kd = student_features.new_zeros(())
    pl = student_features.new_zeros(())
    idx = index.cpu()
    tau = cfg.kd_temperature
    for s, (src, w) in enumerate(zip(sources, weights.tolist())):
        if w == 0.0:
            continue
        target = F.normalize(src.features[idx].to(dev), dim=1)
        pred = F.normalize(projections[s](student_features).float(), dim=1)
        feat = feat + w * (pred - target).pow(2).sum(1).mean()
        if src.logits is None:
            continue
        teacher = src.logits[idx].to(dev)
        if src.same_label_space and cfg.kd_weight > 0:
            kd = kd + w * soft_kl(teacher, student_logits, tau)
        if cfg.pseudo_label_weight > 0:
            pl = pl + w * soft_kl(teacher, heads[s](student_features), tau)
    return feat, kd, pl


def train_student(student: nn.Module, batches: Batches, sources: list[SourceOutputs], weights: torch.Tensor,
                  labelled: tuple[torch.Tensor, torch.Tensor] | None, cfg: DistillConfig, device: torch.device,
                  dataset_size: int, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `student` (in place) on the target: `batches(order)` yields (preprocessed x on `device`, dataset
    indices) in `order` (a permutation per epoch); `labelled` is (preprocessed x, labels) on `device`.
    Returns per-step rows {step, epoch, loss, feature_loss, kd_loss, pseudo_label_loss, ce_loss}."""
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    student.to(device).train()
    with torch.no_grad():
        x0, _ = next(iter(batches(np.arange(min(2, dataset_size)))))
        student_dim = forward_features(student.eval(), x0)[0].shape[1]
    student.train()
    projections = nn.ModuleList(nn.Linear(student_dim, src.features.shape[1]) for src in sources).to(device)
    heads = nn.ModuleList(nn.Linear(student_dim, src.logits.shape[1])
                          if cfg.pseudo_label_weight > 0 and src.logits is not None else nn.Identity()
                          for src in sources).to(device)
    params = list(student.parameters()) + list(projections.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, "adam", cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    step = 0
    for epoch in range(cfg.epochs):
        for x, idx in batches(rng.permutation(dataset_size)):
            if x.shape[0] < 2:
                continue  # BatchNorm needs two images
            f, z = forward_features(student, x)
            feat, kd, pl = distillation_losses(f, z, idx, sources, weights, projections, heads, cfg)
            loss = cfg.feature_weight * feat + cfg.kd_weight * kd + cfg.pseudo_label_weight * pl
            ce = None
            if labelled is not None:
                xl, yl = labelled
                pick = torch.randint(0, len(yl), (min(cfg.labelled_batch_size, len(yl)),), generator=gen)
                xb = random_shift(xl[pick.to(xl.device)], cfg.labelled_shift, gen)
                if xb.shape[0] >= 2:
                    ce = F.cross_entropy(student(xb).float(), yl[pick.to(yl.device)])
                    loss = loss + ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "feature_loss": float(feat.detach()),
                   "kd_loss": float(kd.detach()), "pseudo_label_loss": float(pl.detach()),
                   "ce_loss": None if ce is None else float(ce.detach())}
            history.append(row)
            if on_step is not None:
                on_step(row)
            step += 1
    return history


MODES = ("nearest", "weighted")


def rank_sources(target: list[SourceOutputs], labelled: list[SourceOutputs] | None, labels: torch.Tensor | None,
                 num_classes: int, mode: str, temperature: float = 1.0) -> dict:
    """Similarity of every source to the target task, the weights `mode` gives them and DistillNearest's
    pick. `labelled[s]` are source s's outputs on the labelled target images (`labels`); without them the
    pseudo-labels are each source's own predictions, which needs its classes to be the target's."""
    from . import transferability as T

    scores = []
    for s, out in enumerate(target):
        ref = (labelled[s].features, labels) if labelled is not None else None
        if ref is None and out.probs is None:
            raise ValueError(f"source {s} predicts other classes than the target's: its similarity needs "
                             "a labelled target set")
        scores.append(T.source_similarity(out.features, out.probs, num_classes, ref))
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    weights = nearest_weights(scores) if mode == "nearest" else T.similarity_weights(scores, temperature)
    return {"scores": scores, "weights": weights, "selected": int(np.argmax(scores)),
            "pseudo_labels": "labelled_centroids" if labelled is not None else "source_predictions"}


def _chunks(x: torch.Tensor, size: int = 256):
    for start in range(0, len(x), size):
        yield x[start:start + size], torch.arange(start, min(start + size, len(x)))


def distill(sources: list[nn.Module], same_label_space: list[bool], student: nn.Module, batches: Batches,
            dataset_size: int, labelled: tuple[torch.Tensor, torch.Tensor] | None, num_classes: int, mode: str,
            temperature: float, cfg: DistillConfig, device: torch.device,
            on_step: Callable[[dict], None] | None = None) -> dict:
    """The whole of DistillNearest (`mode="nearest"`) / DistillWeighted (`"weighted"`): source outputs on
    the target, their similarity and weights, then the student trained in place. Returns the report the
    job's metrics carry: per source {index, similarity, weight} in upload order, the selected source."""
    target = [source_outputs(m, batches(None), same) for m, same in zip(sources, same_label_space)]
    lab_out = None
    if labelled is not None:
        lab_out = [source_outputs(m, _chunks(labelled[0]), same) for m, same in zip(sources, same_label_space)]
    plan = rank_sources(target, lab_out, None if labelled is None else labelled[1].cpu(), num_classes, mode,
                        temperature)
    history = train_student(student, batches, target, plan["weights"], labelled, cfg, device, dataset_size, on_step)
    return {"sources": [{"index": i, "similarity": s, "weight": float(w)}
                        for i, (s, w) in enumerate(zip(plan["scores"], plan["weights"]))],
            "selected_source": plan["selected"], "pseudo_labels": plan["pseudo_labels"],
            "similarity_metric": "gbc", "history": history, "source_probs": [o.probs for o in target]}
