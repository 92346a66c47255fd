"""Methods made for segmentation (source-free, several epochs over the target set)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from . import CollapseGuard, LearningRate, Momentum, WeightDecay, describe


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
    lr: LearningRate = Field(1e-6, le=1.0, description="Adam learning rate (the authors' 1e-6 on MRI; digit "
                             "canvases from a small UNet take 1e-4).")
    weight_decay: WeightDecay = Field(0.0, le=1.0)

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


@describe("idm", "oneshot", "IDM, Informative Data Mining for one-shot cross-domain segmentation (Wang, Liang, Xiao, "
          "Mei, Yang, Zhang; ICCV 2023): adapts a source model with a labelled SOURCE pool (`source_data`: images "
          "with masks) and ONE unlabelled target image (`data`; `shots` of them at most). Informative data "
          "mining: the source images are rendered in the target image's style (AdaIN of the first convolution's "
          "channel statistics) and the most uncertain ones (mean pixel entropy per class present) are selected, "
          "re-mined every mine_every steps; at each mining BatchNorm's statistics are re-estimated on the whole "
          "source pool in the target's style (restyled_statistics), and they are frozen while training "
          "(freeze_batch_norm) and re-estimated once more for the exported weights. Each step trains every weight "
          "on the selected source images with patch-wise mixing (a random half of a grid "
          "of patches replaced by the target's, labelled with the model's confident pseudo-labels) by "
          "cross-entropy, plus prototype-based information maximisation on the target image (class prototypes: "
          "EMA of source pixel features by mask; the target's prediction rectified by its prototype similarity; "
          "pixel entropy plus the divergence of the image's mean prediction from the source pool's class "
          "shares, diversity_target). "
          "The paper's setting: DeepLab-v2, GTA5/SYNTHIA -> Cityscapes, one target image; its optimiser "
          "settings are the DeepLab-v2 line's (SGD 2.5e-4, momentum 0.9, weight decay 5e-4, head x10); the mining, "
          "mixing and IM defaults are this service's choices for small canvases (the paper's values were not "
          "available to check). `epochs` counts steps (one pass over the one-shot target set each); 100 by "
          "default: at 300 it lost more on 5 of 6 jobs measured (BENCHMARKS.md, segmentation, \"`idm`'s "
          "steps\"). Which image is the shot matters: over five source models and five shots it gains on every "
          "job of the strong shifts and loses on USPS on average (BENCHMARKS.md, the five-model segmentation "
          "table).",
          updates="all", tasks=("segmentation",), epochs=100, needs_source_data=True)
class IDMParams(CollapseGuard):
    shots: int = Field(1, ge=1, le=16, description="Target images the job may hold in `data` (one-shot: 1); "
                       "a larger target set is refused at submit: evaluate on it through eval_data.")
    select_ratio: float = Field(0.2, gt=0, le=1, description="Fraction of the source pool mined as informative "
                                "(highest uncertainty under the target's style).")
    mine_every: int = Field(50, ge=1, le=100_000, description="Steps between two minings of the source pool "
                            "(the target's pseudo-labels are refreshed with them).")
    source_batch: int = Field(4, ge=1, le=256, description="Mined source images per step, each mixed with the "
                              "target image.")
    patch_grid: int = Field(4, ge=1, le=64, description="Patch-wise mixing: the image is cut into grid x grid "
                            "patches.")
    mix_ratio: float = Field(0.5, ge=0, le=1, description="Fraction of the patches taken from the target image.")
    pseudo_threshold: float = Field(0.968, ge=0, le=1, description="Target pixels whose confidence is below "
                                    "this are ignored in the mixed labels: the DACS/DAFormer line's 0.968 (the "
                                    "paper's value was not available). The mixed patches' pseudo-labels are where "
                                    "idm's losses come from; against 0.9 its mean was higher on every shift "
                                    "measured (BENCHMARKS.md, segmentation, \"`idm`'s pseudo-label threshold\").")
    lambda_im: float = Field(1.0, ge=0, le=1e3, description="Weight of the prototype-based information "
                             "maximisation on the target image.")
    lambda_div: float = Field(1.0, ge=0, le=1e3, description="Weight of its diversity term inside the IM loss: "
                              "KL divergence of the image's mean prediction from `diversity_target`.")
    diversity_target: Literal["source_classes", "uniform"] = Field(
        "source_classes", description="The class distribution the target image's mean prediction is drawn to. "
        "uniform: SHOT's -H(mean), the paper's IM term (every class equally likely on the image; sound for a "
        "street scene holding most classes). source_classes (default): the source pool's pixel share per class, "
        "the same term for imbalanced masks: a digit canvas is ~85 % background and holds 1-3 of 10 digits, so "
        "a uniform target asks one image for digits everywhere. Measured (BENCHMARKS.md, segmentation, \"`idm`: "
        "restyled BatchNorm statistics\"): sensor shift 72.0 vs 58.2 mIoU, no shift and USPS within 0.1.")
    prototype_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the class prototypes.")
    temperature: float = Field(0.1, gt=0, le=10, description="Softmax temperature over the cosine similarity "
                               "of a pixel's features to the class prototypes.")
    restyled_statistics: bool = Field(True, description="BatchNorm statistics re-estimated on the whole source "
                                      "pool rendered in the target image's style (the mining's forward), at "
                                      "every mining (before the target's pseudo-labels and the scores) and once "
                                      "more for the exported weights. False: the statistics the model came with "
                                      "(frozen) or of its training batches. One image's own statistics measured "
                                      "far worse, and batches of 5 (4 mixed + the target) are dominated by that "
                                      "one image. Measured (BENCHMARKS.md, as above; source 88.9 / 82.3 / 2.0 "
                                      "mIoU on no shift / USPS / sensor): 89.7 / 83.6 / 72.0 with it, against "
                                      "81.8 / 52.6 / 8.9 on training-batch statistics and 88.4 / 35.6 / 6.0 "
                                      "frozen at the source's (both with the uniform diversity target), with "
                                      "the first canvas as the shot. Over five source models x five shots "
                                      "each: 89.0 / 82.9 / 78.4 against the source's 90.2 / 83.9 / 4.3 (the "
                                      "image chosen as the shot matters).")
    freeze_batch_norm: bool = Field(True, description="BatchNorm in eval mode while training (the DeepLab-v2 "
                                    "line's frozen BatchNorm, usual at batches of ~5): every batch is normalised "
                                    "with the running statistics (the restyled source pool's, or with "
                                    "restyled_statistics false the model's own). False: statistics of the mixed "
                                    "batches (restyled source images + the target), their running averages "
                                    "tracked (and exported unless restyled_statistics).")
    lr: LearningRate = Field(2.5e-4, le=1.0, description="SGD learning rate (the DeepLab-v2 line's 2.5e-4).")
    momentum: Momentum = Field(0.9, description="SGD momentum.")
    weight_decay: WeightDecay = Field(5e-4, le=1.0, description="SGD weight decay.")
    head_lr_scale: float = Field(10.0, gt=0, le=1e3, description="lr multiplier of the segmentation head.")
    collapse_entropy_ratio: float = Field(
        0.1, gt=0, lt=1, description="The collapse guard's threshold (see the other methods; 0.25 there): lower "
        "here because it watches few canvases per step (source_batch mixed images and the target); set when "
        "the guard watched the pixel histogram and not re-measured with the per-image class presence it "
        "watches now. An all-background mask (entropy 0) is caught either way.")
