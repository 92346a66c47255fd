"""SHOT (Liang et al., ICML 2020): source hypothesis transfer. The classifier (the source hypothesis)
is frozen; the feature extractor learns to make target features that it classifies confidently
(low per-sample entropy) and diversely (high entropy of the mean prediction), plus a cross-entropy to
pseudo-labels from class centroids that are recomputed at the start of every epoch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.contract.catalog.sfda import ShotParams

from ._sfda import SFDAMethod, information_maximisation
from .base import StepOutput
from .registry import implements


@torch.no_grad()
def centroid_pseudo_labels(features: torch.Tensor, probs: torch.Tensor, threshold: int = 0,
                           distance: str = "cosine") -> torch.Tensor:
    """Self-supervised pseudo-labels: class centroids weighted by the predicted probabilities, each
    sample labelled by its nearest centroid; then one more round with hard-label centroids.

    Cosine distance works on the features with a constant 1 appended (the classifier's bias) and
    L2-normalised, as the reference. Only classes predicted for more than `threshold` samples get a
    centroid."""
    features = features.float()
    probs = probs.float()
    num_classes = probs.shape[1]
    if distance == "cosine":
        features = torch.cat([features, features.new_ones(features.shape[0], 1)], 1)
        features = F.normalize(features, dim=1)
    counts = torch.bincount(probs.argmax(1), minlength=num_classes)
    labelset = torch.nonzero(counts > threshold).flatten()
    if labelset.numel() == 0:
        labelset = torch.arange(num_classes, device=probs.device)

    weights = probs
    labels = None
    for _ in range(2):  # soft-weighted centroids, then one refinement with hard labels
        centroids = weights.T @ features / (1e-8 + weights.sum(0)[:, None])
        centroids = centroids[labelset]
        if distance == "cosine":
            dist = 1 - features @ F.normalize(centroids, dim=1).T
        else:
            dist = torch.cdist(features, centroids)
        labels = labelset[dist.argmin(1)]
        weights = F.one_hot(labels, num_classes).to(features.dtype)
    return labels


@implements(ShotParams)
class Shot(SFDAMethod):
    state_attrs = ("pseudo_labels", "pseudo_label_agreement")

    def __init__(self, model, params, ctx):
        # agreement of the pseudo-labels with the model's predictions at each epoch start (for report())
        self.agreement_per_epoch: list[torch.Tensor] = []
        super().__init__(model, params, ctx)

    @property
    def beta(self) -> float:
        return self.params.beta

    def begin_epoch(self, epoch: int) -> None:
        if self.beta > 0:
            self.refresh_pseudo_labels()

    def refresh_pseudo_labels(self) -> None:
        feats, logits = self.target_pass()
        self.pseudo_labels = centroid_pseudo_labels(feats, logits.softmax(1), self.params.threshold,
                                                    self.params.distance)
        # how far the clustering moved the labels from the model's own predictions (logged)
        self.pseudo_label_agreement = (self.pseudo_labels == logits.argmax(1)).float().mean()
        self.agreement_per_epoch.append(self.pseudo_label_agreement)

    def report(self) -> dict:
        out = super().report()
        if self.beta > 0:
            out["pseudo_label_agreement_per_epoch"] = [round(float(a), 4) for a in self.agreement_per_epoch]
        return out

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        if self.beta > 0 and self.pseudo_labels is None:  # restored to a state from before epoch 0 began
            self.refresh_pseudo_labels()
        self.advance_schedule()
        _, logits = self.forward(x)
        probs = logits.softmax(1)
        im = information_maximisation(probs, p.epsilon, p.gent)
        loss = p.ent_par * im
        logs = {"im_loss": im.detach()}
        if self.beta > 0:
            ce = F.cross_entropy(logits, self.pseudo_labels[index])
            loss = loss + self.beta * ce
            logs["pseudo_label_ce"] = ce.detach()
            logs["pseudo_label_agreement"] = self.pseudo_label_agreement
        self.update(loss)
        return StepOutput(logits.detach(), loss.detach(), logs)
