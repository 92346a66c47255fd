"""Methods made for segmentation (source-free, several epochs over the target set)."""
from __future__ import annotations

from pydantic import Field, model_validator

from . import CollapseGuard, describe


@describe("sfda_prior", "sfda", "Source-free segmentation with a class-ratio prior (Bateson, Kervadec, Dolz, "
          "Lombaert, Ben Ayed; MedIA 2022; their EntKLProp loss): class-weighted Shannon entropy of the pixel "
          "softmax + KL(τ̂ ‖ τ_prior), τ̂ the image's soft class proportions (pixel probabilities divided by "
          "their per-pixel maximum, summed over pixels, normalised over classes); every weight is updated "
          "with Adam, BatchNorm on batch statistics. Authors' setting (prostate/heart MRI, 2-5 classes): lr "
          "1e-6, 100 epochs, λ = 1 for both terms, entropy weights [0.1, 0.9] (2 classes).",
          updates="all", tasks=("segmentation",))
class SFDAPriorParams(CollapseGuard):
    class_ratio_prior: list[float] = Field(
        ..., min_length=2, max_length=1000,
        description="Expected proportion of each class's pixels in an image, class 0 first (e.g. from "
        "one typical size per class); normalised to sum 1. A class with proportion 0 is pushed out.")
    class_weights: list[float] | None = Field(
        None, description="Per-class weights of the entropy term; default: 0.1 for class 0 (background) "
        "and 0.9 split evenly over the others (the authors' [0.1, 0.9] for two classes).")
    lambda_entropy: float = Field(1.0, ge=0, le=1e3, description="Weight of the entropy term.")
    lambda_prior: float = Field(1.0, ge=0, le=1e3, description="Weight of the KL-to-prior term.")
    lr: float = Field(1e-6, gt=0, le=1.0, description="Adam learning rate (the authors' 1e-6 on MRI; digit "
                      "canvases from a small UNet take 1e-4).")
    weight_decay: float = Field(0.0, ge=0, le=1.0)

    @model_validator(mode="after")
    def _check(self):
        if any(not (0 <= v <= 1e9) for v in self.class_ratio_prior) or sum(self.class_ratio_prior) <= 0:
            raise ValueError("class_ratio_prior must hold non-negative numbers with a positive sum")
        if self.class_weights is not None and (len(self.class_weights) != len(self.class_ratio_prior)
                                               or any(not (0 <= v <= 1e3) for v in self.class_weights)):
            raise ValueError("class_weights must have one non-negative weight per class of class_ratio_prior")
        return self
