"""AaD (Yang et al., NeurIPS 2022): attracting and dispersing.

Attract: each sample's prediction is pulled towards the stored predictions of its K nearest
neighbours in the feature bank (dot product with the score bank). Disperse: the predictions of the
other samples in the batch are pushed apart (sum of pairwise dot products), with a weight
alpha·(1 + 10·t/T)^-beta that decays over the run. Both prediction copies in the dispersion term
receive gradients, as the reference.

The authors' VisDA script also trains the classifier (a second SGD optimizer at the base lr); here the
classifier stays frozen, as in every SFDA method of this service (docs/ARCHITECTURE.md §4), and only the feature
extractor adapts."""
from __future__ import annotations

import torch

from app.contract.catalog.sfda import AaDParams

from ._sfda import NeighbourhoodMethod
from .base import StepOutput
from .registry import implements


@implements(AaDParams)
class AaD(NeighbourhoodMethod):
    def neighbours(self) -> int:
        return self.params.K

    def dispersion_weight(self) -> float:
        p = self.params
        if not p.alpha_decay:
            return p.alpha
        # the reference computes it before counting the current step
        return p.alpha * (1 + 10 * (self.iteration - 1) / self.max_iterations) ** -p.beta

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        p = self.params
        logits, probs, normed = self.forward_into_banks(x, index)
        with torch.no_grad():
            score_near = self.score_bank[self.nearest(normed, p.K)]              # B×K×C

        attract = -torch.einsum("bc,bkc->b", probs, score_near).mean()
        gram = probs @ probs.T
        disperse = (gram.sum(1) - gram.diagonal()).mean()
        alpha = self.dispersion_weight()
        loss = attract + alpha * disperse
        self.update(loss)
        return StepOutput(logits.detach(), loss.detach(),
                          {"attract_loss": attract.detach(), "disperse_loss": disperse.detach()})
