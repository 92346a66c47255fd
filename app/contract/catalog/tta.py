"""Test-time adaptation methods (online: each batch once, predict then adapt)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from . import CollapseGuardParams, LearningRate, Momentum, Optimizer, WeightDecay, describe

AdamOrSGDMomentum = Annotated[Momentum, Field(description="SGD momentum (ignored by Adam).")]
TeacherMomentum = Annotated[Momentum, Field(description="EMA momentum of the teacher.")]
HorizontalFlips = Annotated[bool, Field(description="Random horizontal flips among the augmentations (the "
                                        "reference's, made for natural images); turn off where a mirror image "
                                        "changes the class (digits, text).")]


@describe("tent", "tta", "TENT (Wang et al., ICLR 2021): minimise the mean softmax entropy (per pixel for "
          "segmentation), updating only the affine parameters of the norm layers, one step per batch. "
          "Segmentation defaults (task_defaults): SGD 2.5e-4, momentum 0.9, weight decay 5e-4, as the reference "
          "library's segmentation/ (which also resets after every image: reset_each=1 here).",
          updates="norm_affine", tasks=("classification", "segmentation"),
          task_defaults={"segmentation": {"optimizer": "sgd", "lr": 2.5e-4, "weight_decay": 5e-4}})
class TentParams(CollapseGuardParams):
    optimizer: Optimizer = Field("adam", description="Adam for CIFAR-scale, SGD for ImageNet and "
                                 "segmentation (task default).")
    lr: LearningRate = Field(1e-3, description="1e-3 with Adam (CIFAR); 2.5e-4 with SGD (ImageNet, batch 64; "
                             "segmentation, task default).")
    momentum: AdamOrSGDMomentum = 0.9
    weight_decay: WeightDecay = Field(0.0, le=1.0, description="0 for classification; 5e-4 for segmentation "
                                      "(task default).")
    steps: int = Field(1, ge=1, le=10, description="Gradient steps per batch.")


# Reference hyper-parameters below: the authors' code and mariodoebler/test-time-adaptation (the
# benchmark library the BENCHMARKS.md anchors come from). CIFAR values are the defaults; the ImageNet
# values (ResNet-50, batch 64) are given in each description. That library's SGD uses Nesterov momentum
# 0.9; Adam uses betas (0.9, 0.999), no weight decay.


@describe("eata", "tta", "EATA without its Fisher term, i.e. ETA (Niu et al., ICML 2022): entropy "
          "minimisation on the norm layers' affine parameters, only on reliable samples (entropy < "
          "e_margin·ln C) that are not redundant (cosine similarity of their softmax to an EMA(0.9) of the "
          "mean prediction < d_margin), each weighted by 1/exp(H − E0). The Fisher anti-forgetting term needs "
          "source images, which this service never has, so it is not offered.",
          updates="norm_affine")
class EATAParams(CollapseGuardParams):
    optimizer: Optimizer = Field(
        "adam", description="Adam for CIFAR (reference library); SGD with Nesterov momentum 0.9 for ImageNet.")
    lr: LearningRate = Field(1e-3, description="1e-3 with Adam (CIFAR); 2.5e-4 with SGD (ImageNet, batch 64).")
    momentum: AdamOrSGDMomentum = 0.9
    e_margin: float = Field(0.4, gt=0, le=1, description="Reliability filter: keep samples whose entropy is "
                            "below e_margin × ln(num_classes) (E0 in the paper; 0.4 for CIFAR and ImageNet).")
    d_margin: float = Field(0.4, ge=0, le=1, description="Redundancy filter: keep samples whose softmax has "
                            "cosine similarity below d_margin to the EMA of mean predictions. 0.4 CIFAR, "
                            "0.05 ImageNet.")


@describe("sar", "tta", "SAR (Niu et al., ICLR 2023): sharpness-aware (SAM, rho 0.05, over SGD momentum 0.9) "
          "and reliable (entropy < 0.4·ln C on both SAM passes) entropy minimisation of the norm layers' "
          "affine parameters, except those of the network's last stage; resets to the source weights when "
          "the EMA(0.9) of the second-pass loss falls below reset_constant_em. Works on BatchNorm, GroupNorm "
          "and LayerNorm models (batch size 1 is fine without BatchNorm).",
          updates="norm_affine_but_last")
class SARParams(CollapseGuardParams):
    lr: LearningRate = Field(1e-3, description="Base SGD lr: 1e-3 for CIFAR (reference library) and for ViT "
                             "(LayerNorm, batch 64); 2.5e-4 for ResNet-50 on ImageNet (batch 64).")
    momentum: Momentum = Field(0.9, description="Momentum of the base SGD (plain, no Nesterov).")
    rho: float = Field(0.05, gt=0, description="SAM neighbourhood radius.")
    e_margin: float = Field(0.4, gt=0, le=1, description="Reliability filter: entropy < e_margin × ln(num_classes).")
    reset_constant_em: float = Field(0.2, ge=0, description="Reset to the source weights when the EMA(0.9) of "
                                     "the second-pass entropy loss falls below this (0 disables the reset).")
    skip_modules: list[str] | None = Field(
        None, description="Module-name prefixes whose norm layers are NOT adapted. null = automatic 'last "
        "stage': the last quarter (at least one) of the network's top-level stages, found by descending "
        "through single wrappers (ResNet: layer4; WRN: block3; ViT with 12 blocks: blocks.9-11), plus the "
        "norm layers that follow them (a ViT's final norm). [] adapts every norm layer (what the reference "
        "library does on WRN-28-10, whose module names its filter does not match).")


# CoTTA for segmentation (its authors' Cityscapes -> ACDC setting, and mariodoebler/test-time-adaptation's
# `segmentation/` defaults): SGD 2.5e-4 (momentum 0.9, no Nesterov, weight decay 5e-4), the head at 10x the
# lr, a teacher averaged over 6 scales with random flips when the anchor's mean pixel confidence is below 0.9.
COTTA_SEGMENTATION = {"optimizer": "sgd", "lr": 2.5e-4, "nesterov": False, "weight_decay": 5e-4,
                      "head_lr_scale": 10.0, "ap": 0.9}


@describe("cotta", "tta", "CoTTA (Wang et al., CVPR 2022): the student (all weights) learns the cross-entropy "
          "to an EMA teacher (0.999), whose prediction averages augmented views when the source model's "
          "mean confidence is below ap; then each weight returns to its source value with probability "
          "restore_prob. Predictions and the exported model are the teacher's. Classification: 32 random "
          "views (colour, affine, blur, flip, noise) batched on the device. Segmentation (per pixel): the "
          "teacher's logits averaged over the input and `scales` resized views, each image flipped at random "
          "(logits resized back and unflipped), and the segmentation head trained at head_lr_scale x lr. "
          "Defaults differ by task (task_defaults): segmentation takes SGD 2.5e-4, no Nesterov, weight decay "
          "5e-4, head x10, ap 0.9 (the reference library's segmentation/ setting).",
          updates="all", tasks=("classification", "segmentation"),
          task_defaults={"segmentation": COTTA_SEGMENTATION})
class CoTTAParams(CollapseGuardParams):
    optimizer: Optimizer = Field(
        "adam", description="Adam for CIFAR; SGD for ImageNet and for segmentation (its task default).")
    lr: LearningRate = Field(1e-3, description="1e-3 with Adam (CIFAR); 0.01 with SGD (ImageNet, batch 64); "
                             "2.5e-4 with SGD for segmentation (task default).")
    momentum: AdamOrSGDMomentum = 0.9
    nesterov: bool = Field(True, description="Nesterov momentum with SGD: the reference library's classification "
                           "setting; its segmentation setting has none (task default false).")
    weight_decay: WeightDecay = Field(0.0, le=1.0, description="0 for classification; 5e-4 for segmentation "
                                      "(task default).")
    head_lr_scale: float = Field(1.0, gt=0, le=1e3, description="lr multiplier of the segmentation head (the "
                                 "modules producing the class logits): 10 for segmentation (task default).")
    teacher_momentum: TeacherMomentum = 0.999
    restore_prob: float = Field(0.01, ge=0, le=1, description="Stochastic restore probability per weight "
                                "element: 0.01 CIFAR and segmentation, 0.001 ImageNet.")
    ap: float = Field(0.92, ge=0, le=1, description="Augment-average the teacher when the anchor (source) "
                      "model's mean max-probability (per pixel for segmentation) is below this: 0.92 CIFAR10, "
                      "0.1 ImageNet, 0.9 segmentation (task default).")
    n_augmentations: int = Field(32, ge=1, le=128, description="Augmented views averaged by the teacher "
                                 "(classification; segmentation uses one view per scale).")
    scales: list[float] = Field(
        [0.25, 0.375, 0.5, 0.625, 0.75, 0.875], min_length=1, max_length=16,
        description="Segmentation: the teacher's view sizes as fractions of the input size. CoTTA's "
        "multi-scale ratios 0.5-1.75 are relative to half the test size (2.0 is the input itself), so the "
        "reference library's views are ratio x 0.5 x its input crop: 0.25-0.875 of the input.")
    loss: Literal["ce", "symmetric"] = Field(
        "ce", description="ce: cross-entropy student ← teacher (CIFAR, segmentation); symmetric: the mean of "
        "both directions (the reference's ImageNet variant).")
    hflip: HorizontalFlips = True

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not (0.05 <= r <= 4.0) for r in v):
            raise ValueError("scales must lie in 0.05..4")
        return v


@describe("rmt", "tta", "RMT (Döbler et al., CVPR 2023), source-free variant: the student (all weights) and "
          "a projector learn a symmetric cross-entropy to an EMA teacher on the original and an augmented "
          "view, plus a contrastive loss pulling each sample's projected features towards its nearest class "
          "prototype. Without source data there is no source replay and no warm-up, and the prototypes are "
          "built from the teacher's confidence-weighted features on the first target batches. Predictions are "
          "student + teacher logits (as the reference); the exported model is the teacher.",
          updates="all")
class RMTParams(CollapseGuardParams):
    optimizer: Optimizer = Field(
        "adam", description="Adam for CIFAR; SGD (Nesterov momentum 0.9) for ImageNet.")
    lr: LearningRate = Field(1e-3, description="1e-3 with Adam (CIFAR); 0.01 with SGD (ImageNet, batch 64).")
    momentum: AdamOrSGDMomentum = 0.9
    teacher_momentum: TeacherMomentum = 0.999
    lambda_ce_trg: float = Field(1.0, ge=0, description="Weight of the symmetric cross-entropy to the teacher.")
    lambda_cont: float = Field(1.0, ge=0, description="Weight of the contrastive prototype loss.")
    temperature: float = Field(0.1, gt=0, description="Contrastive temperature.")
    projection_dim: int = Field(128, ge=8, le=4096, description="Output size of the projector MLP.")
    prototype_batches: int = Field(
        10, ge=1, description="Target batches whose teacher features (weighted by the teacher's confidence, "
        "grouped by its predicted class) build the class prototypes; they are frozen afterwards, standing "
        "in for the reference's source prototypes.")
    hflip: HorizontalFlips = True


@describe("roid", "tta", "ROID (Marsden et al., WACV 2024): soft likelihood ratio loss weighted by diversity "
          "× certainty (temperature 1/3), a consistency loss to one augmented view (batched on the device), "
          "on the norm layers' affine parameters; after each step the weights are ensembled with the source "
          "weights (θ ← 0.99·θ + 0.01·θ_src), and the returned predictions are corrected by a smoothed "
          "estimate of the batch's label prior.",
          updates="norm_affine")
class ROIDParams(CollapseGuardParams):
    optimizer: Optimizer = Field(
        "adam", description="Adam for CIFAR; SGD (Nesterov momentum 0.9) for ImageNet.")
    lr: LearningRate = Field(1e-3, description="1e-3 with Adam (CIFAR); 2.5e-4 with SGD (ImageNet, batch 64).")
    momentum: AdamOrSGDMomentum = 0.9
    momentum_src: float = Field(0.99, ge=0, le=1, description="Weight ensembling: θ ← m·θ + (1−m)·θ_src "
                                "after every step (1 disables it).")
    momentum_probs: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the mean prediction used by "
                                  "the diversity weight.")
    temperature: float = Field(1 / 3, gt=0, description="Weights are exp(diversity × certainty / T).")
    use_weighting: bool = Field(True, description="Diversity × certainty weighting (and dropping the "
                                "samples of below-mean diversity).")
    use_consistency: bool = Field(True, description="Symmetric cross-entropy to an augmented view.")
    use_prior_correction: bool = Field(True, description="Correct the returned predictions with the smoothed "
                                       "batch prior.")
    hflip: HorizontalFlips = True
