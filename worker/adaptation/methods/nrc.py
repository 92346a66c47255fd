"""NRC (Yang et al., NeurIPS 2021): neighbourhood reciprocity clustering for source-free adaptation.

Target features that are close should get the same prediction. Each sample's prediction is pulled
towards the stored predictions (score bank) of its K nearest neighbours in a bank of normalised
features: with affinity `reciprocal_affinity` (the paper's 1; 0.1 in the authors' code, the default)
when the relation is reciprocal (the sample is among its neighbour's own KK nearest neighbours), r
otherwise; and towards its expanded neighbours (the KK nearest of each
neighbour) with affinity r. A diversity term on the batch-mean prediction prevents the trivial
solution. The pull is a dot product with the (constant) stored scores: the reference's
kl_div(prob, score) differs from it only by a constant.

The authors' VisDA script also trains the classifier (a second SGD optimizer at the base lr); here the
classifier stays frozen, as in every SFDA method of this service (docs/ARCHITECTURE.md §4), and only the feature
extractor adapts."""
from __future__ import annotations

import torch

from app.contract.catalog.sfda import NRCParams

from ._sfda import NeighbourhoodMethod
from .base import StepOutput
from .registry import implements


@implements(NRCParams)
class NRC(NeighbourhoodMethod):
    def neighbours(self) -> int:
        return max(self.params.K, self.params.KK)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        logits, probs, normed = self.forward_into_banks(x, index)
        with torch.no_grad():
            near = self.nearest(normed, p.K)                                      # B×K
            score_near = self.score_bank[near]                                    # B×K×C
            affinity = torch.full(near.shape, p.r, device=probs.device)
            if p.KK > 0:
                near_near = self.nearest(self.feature_bank[near], p.KK)           # B×K×KK
                reciprocal = (near_near == index[:, None, None]).any(-1)          # B×K
                affinity = torch.where(reciprocal, torch.full_like(affinity, p.reciprocal_affinity), affinity)
                score_expanded = self.score_bank[near_near].flatten(1, 2)         # B×(K·KK)×C

        # neighbours: -sum_k A_ik <p_i, s_k>
        loss_near = -(torch.einsum("bc,bkc->bk", probs, score_near) * affinity).sum(1).mean()
        loss = loss_near
        logs = {"neighbour_loss": loss_near.detach()}
        if p.KK > 0:
            loss_expanded = -(torch.einsum("bc,bkc->bk", probs, score_expanded) * p.r).sum(1).mean()
            loss = loss + loss_expanded
            logs["expanded_loss"] = loss_expanded.detach()
            logs["reciprocal_fraction"] = reciprocal.float().mean()
        mean = probs.mean(0)
        diversity = (mean * torch.log(mean + p.epsilon)).sum()   # minus the entropy of the mean
        loss = loss + diversity
        logs["diversity_loss"] = diversity.detach()
        self.update(loss)
        return StepOutput(logits.detach(), loss.detach(), logs)
