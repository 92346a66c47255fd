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
          updates="all", tasks=("segmentation",), epochs=100)
class SFDAPriorParams(CollapseGuard):
    class_ratio_prior: list[float] | list[list[float]] | None = Field(
        None, min_length=1,
        description="Expected proportion of each class's pixels, class 0 first, normalised to sum 1: one list "
        "of K numbers for every image, or one such list per target image in stored order (the authors' "
        "setting: one typical size per class times the image's tags, 0 for a class the image does not hold). "
        "A class with proportion 0 is pushed out of that image. Give this or `prior_upload`.")
    prior_upload: str | None = Field(
        None, min_length=1, max_length=64, json_schema_extra={"upload_kind": "prior"},
        description="The prior as a file: the id of an upload of kind `prior` (POST /v1/uploads?kind=prior), "
        "JSON or CSV: per-image proportions or pixel sizes, or one size per class with per-image tags "
        "(Bateson's estimate; a class tagged absent gets 0). Formats: README, 'Segmentation data'. Give this "
        "or `class_ratio_prior`.")
    class_weights: list[float] | None = Field(
        None, description="Per-class weights of the entropy term; default: 0.1 for class 0 (background) "
        "and 0.9 split evenly over the others (the authors' [0.1, 0.9] for two classes).")
    lambda_entropy: float = Field(1.0, ge=0, le=1e3, description="Weight of the entropy term.")
    lambda_prior: float = Field(1.0, ge=0, le=1e3, description="Weight of the KL-to-prior term.")
    lr: float = Field(1e-6, gt=0, le=1.0, description="Adam learning rate (the authors' 1e-6 on MRI; digit "
                      "canvases from a small UNet take 1e-4).")
    weight_decay: float = Field(0.0, ge=0, le=1.0)

    @property
    def prior_rows(self) -> list[list[float]] | None:
        """The inline prior's rows; None when the prior is an upload."""
        p = self.class_ratio_prior
        if p is None:
            return None
        return p if p and isinstance(p[0], list) else [p]  # type: ignore[list-item]

    @model_validator(mode="after")
    def _check(self):
        if (self.class_ratio_prior is None) == (self.prior_upload is None):
            raise ValueError("give the prior as class_ratio_prior (a list of class proportions, or one per image) "
                             "or as prior_upload (the id of a JSON/CSV upload of kind 'prior'), one of the two")
        rows = self.prior_rows
        if rows is None:
            if self.class_weights is not None and any(not (0 <= v <= 1e3) for v in self.class_weights):
                raise ValueError("class_weights must be non-negative")
            return self
        k = len(rows[0])
        if k < 2 or any(len(r) != k for r in rows):
            raise ValueError("class_ratio_prior: every row needs the same number (≥ 2) of class proportions")
        if any(not (0 <= v <= 1e9) for r in rows for v in r) or any(sum(r) <= 0 for r in rows):
            raise ValueError("class_ratio_prior must hold non-negative numbers with a positive sum per row")
        if self.class_weights is not None and (len(self.class_weights) != k
                                               or any(not (0 <= v <= 1e3) for v in self.class_weights)):
            raise ValueError("class_weights must have one non-negative weight per class of class_ratio_prior")
        return self
