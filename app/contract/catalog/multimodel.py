"""Jobs over several models: multi-source distillation into a student (several `models`, one `student`)
and `auto` (several candidate methods on one `model`, one picked without labels)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from . import CATALOG, LearningRate, MethodParams, WeightDecay, describe

# The runner trains the student for the job's `options.epochs` passes over the unlabelled target set
# (as for the SFDA methods); the method has no epoch param of its own.


class DistillParams(MethodParams):
    """Student training (Borup, Phoo, Hariharan, ICCV 2023: no source data, "merely features and
    pseudo-labels of the source models", a few labelled target images plus unlabelled ones). Only the
    paper's abstract could be read (worker/adaptation/transferability.py says where we looked): the losses
    and defaults below are this implementation's, measured in BENCHMARKS.md, not the authors' checked
    values. Per step: feature distillation (a linear projection of the student's features onto each
    source's, squared distance of the L2-normalised vectors) + cross-entropy on a batch of the labelled
    images; optionally pseudo-label distillation (`pseudo_label_weight`: a head per source on the student's
    features learns that source's soft predictions over its own classes, any label space) and logit
    distillation into the student's classifier (`kd_weight`, sources whose classes are the student's), both
    at temperature τ."""

    lr: LearningRate = Field(1e-3, description="Adam learning rate (student and projections).")
    weight_decay: WeightDecay = 5e-4
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature-distillation loss.")
    kd_weight: float = Field(0.0, ge=0, description="Weight of a logit-distillation loss (sources with the "
                             "student's classes only). 0: the paper distils features only; on the digit "
                             "benchmark 1.0 made students worse than the labelled images alone (BENCHMARKS.md).")
    pseudo_label_weight: float = Field(0.0, ge=0, description="Weight of pseudo-label distillation: a linear "
                                       "head per source on the student's features predicts that source's soft "
                                       "pseudo-labels over its own classes (the form of Phoo & Hariharan's "
                                       "STARTUP, ICLR 2021; works across label spaces). 0: off (BENCHMARKS.md "
                                       "measures 1.0 on the digit pool).")
    kd_temperature: float = Field(4.0, gt=0, description="Distillation temperature τ (Hinton et al.) of the "
                                  "pseudo-label and logit losses.")
    labelled_batch_size: int = Field(32, ge=1, description="Labelled images per step (with labelled_data).")
    labelled_shift: int = Field(2, ge=0, le=8, description="Labelled images are randomly translated by up to "
                                "this many pixels (the few labels are seen many times).")


@describe("distill_nearest", "multisource",
          "DistillNearest (Borup et al., ICCV 2023): rank the source models by task similarity on the target "
          "(Gaussian Bhattacharyya Coefficient of each source's features under pseudo-labels: the labelled "
          "target images' class centroids when labelled_data is given, else the source's own predictions) "
          "and distil the most similar one into the student. The metric, the pseudo-labels and the losses "
          "are this implementation's (only the paper's abstract could be checked; BENCHMARKS.md measures them).",
          updates="all")
class DistillNearestParams(DistillParams):
    pass


@describe("distill_weighted", "multisource",
          "DistillWeighted (Borup et al., ICCV 2023): distil every source model into the student, each "
          "weighted by its task similarity to the target (softmax of the similarities at `temperature`).",
          updates="all")
class DistillWeightedParams(DistillParams):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature over the similarities "
                               "(-ln of the mean class overlap): at 1 a source with e times less overlap gets "
                               "e times the weight; towards 0 all weight goes to the nearest source.")


DEFAULT_CANDIDATES = ("bn_adapt", "tent", "shot")
MAX_CANDIDATES = 6


@describe("auto", "auto",
          "Run several adaptation methods (`candidates`) on the model and keep the one a label-free "
          "criterion picks; every candidate's score, and its true accuracy when eval_data has labels, is in "
          "the metrics. The exported model is the pick's. eval_data never enters the pick: selecting on the "
          "data the accuracy is reported on is the malpractice Efthymiadis, Tolias & Chum (WACV 2025, "
          "arXiv 2409.19774, crafting distribution shifts for validation without target labels) avoid by "
          "validating on source images transformed by a broad list of augmentations; a source-free job has "
          "no labelled source images, so the criteria here score the candidates' predictions on the "
          "unlabelled target instead (BENCHMARKS.md measures each pick against the best candidate).",
          updates="all")
class AutoParams(MethodParams):
    candidates: list[str] = Field(list(DEFAULT_CANDIDATES), min_length=1, max_length=MAX_CANDIDATES,
                                  description="Method names, each run with its default params.")
    criterion: Literal["bounded_confidence", "confidence", "agreement", "snd"] = Field(
        "bounded_confidence", description="bounded_confidence: mean max-probability capped by the "
        "predicted-class histogram (a collapsed candidate scores at most 1/C); confidence: mean "
        "max-probability (Hendrycks & Gimpel 2017); agreement: agreement with the candidates' majority vote "
        "(Jiang et al. 2022, Chen et al. 2021); snd: soft neighbourhood density (Saito et al. 2021). "
        "BENCHMARKS.md measures how far each one's pick falls from the best candidate.")
    budget_s: float | None = Field(None, gt=0, description="No candidate starts after this many seconds "
                                   "(the first always runs); skipped ones are listed in the metrics.")

    @field_validator("candidates")
    @classmethod
    def _single_model_methods(cls, v: list[str]) -> list[str]:
        for name in v:
            info = CATALOG.get(name)
            if info is None or info.kind not in ("baseline", "tta", "sfda"):
                raise ValueError(f"{name!r} is not a single-model method; candidates: "
                                 f"{', '.join(n for n, i in CATALOG.items() if i.kind in ('baseline', 'tta', 'sfda'))}")
        if len(set(v)) != len(v):
            raise ValueError("candidates must be distinct")
        return v
