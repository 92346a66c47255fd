"""Source-free domain adaptation methods (several epochs over the target set)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import CollapseGuard, LearningRate, Momentum, WeightDecay, describe



# The runner drives every SFDA method for the job's `options.epochs` passes over the target set (each
# pass in a fresh seeded shuffle); without it, for the method's schedule (`epochs` of `describe`, served
# in GET /v1/methods as `cost`). The method has no epoch param of its own.


class SFDAParams(CollapseGuard):
    """Shared by the SFDA methods: SGD with the authors' schedule and the collapse guard.

    Reference schedule (SHOT, NRC and AaD share it): SGD momentum 0.9, Nesterov, weight decay 1e-3 and
    lr_t = lr * (1 + 10 t / T) ** -0.75 over the T steps of the whole run. The feature extractor is split
    into a backbone and a bottleneck (the layers between backbone and classifier, `bottleneck` in the
    built-in digit models); the backbone's lr is `lr * backbone_lr_mult`. The classifier is frozen."""

    lr: LearningRate = Field(0.01, description="Base learning rate (bottleneck layers).")
    backbone_lr_mult: float = Field(
        1.0, ge=0, le=1,
        description="Backbone lr = lr × this. The authors use 1.0 on digits (LeNet trained from scratch) and "
        "0.1 on ImageNet-pretrained backbones (Office, VisDA). Models without a `bottleneck` module have "
        "every feature-extractor weight in the backbone.")
    momentum: Momentum = 0.9
    weight_decay: WeightDecay = Field(1e-3, description="1e-3: what the reference scripts' lr scheduler sets.")
    nesterov: bool = True
    lr_decay: bool = Field(True, description="Polynomial decay lr·(1 + 10·t/T)^-0.75 over the whole run "
                           "(T = epochs × batches per epoch), as the reference; False keeps lr constant.")


class _InformationMaximisation(SFDAParams):
    ent_par: float = Field(1.0, ge=0, description="Weight of the information-maximisation loss.")
    gent: bool = Field(True, description="Subtract the entropy of the batch-mean prediction (diversity).")
    epsilon: float = Field(1e-5, gt=0, description="Added inside the logarithms, as the reference.")


@describe("shot_im", "sfda", "SHOT-IM (Liang et al., ICML 2020): SHOT without pseudo-labels: information "
          "maximisation only (mean per-sample entropy minus the entropy of the mean prediction), updating "
          "the feature extractor with the classifier frozen. Default schedule: 15 epochs (the authors' on "
          "Office/VisDA; 30 on digits, where 15 reach the same accuracy here).", epochs=15,
          updates="all_but_classifier")
class ShotIMParams(_InformationMaximisation):
    pass


@describe("shot", "sfda", "SHOT (Liang et al., ICML 2020): information maximisation + beta × cross-entropy to "
          "self-supervised pseudo-labels (prediction-weighted class centroids in the normalised feature "
          "space, cosine distance, one refinement round with hard-label centroids), recomputed at the start "
          "of every epoch; updates the feature extractor with the classifier frozen. beta 0.1 digits / 0.3 "
          "objects. Default schedule: 15 epochs (the authors' on Office/VisDA; 30 on digits, where 15 reach "
          "the same accuracy here), plus one forward pass over the target per epoch for the pseudo-labels.",
          epochs=15, forward_passes_per_epoch=1,
          updates="all_but_classifier")
class ShotParams(_InformationMaximisation):
    beta: float = Field(0.1, ge=0, description="Weight of the pseudo-label cross-entropy (cls_par): 0.1 "
                        "digits, 0.3 Office/VisDA. 0 is SHOT-IM.")
    threshold: int = Field(0, ge=0, description="Only classes the model predicts for more than this many "
                           "target samples get a centroid.")
    distance: Literal["cosine", "euclidean"] = Field("cosine", description="Distance to the centroids.")


@describe("nrc", "sfda", "NRC (Yang et al., NeurIPS 2021): neighbourhood reciprocity clustering. Feature and "
          "score memory banks over the whole target set; each sample's prediction is pulled towards its K "
          "nearest neighbours' (weight reciprocal_affinity if the neighbour has it among its own KK nearest, else r) and its "
          "expanded KK-neighbours' (weight r), plus a diversity term on the batch-mean prediction. Updates "
          "the feature extractor, classifier frozen. Defaults: the authors' VisDA values (no digits "
          "experiments in the paper) but lr (see lr), 15 epochs, plus one forward pass over the target to fill the banks.",
          epochs=15, forward_passes_once=1,
          updates="all_but_classifier")
class NRCParams(SFDAParams):
    lr: LearningRate = Field(0.003, description="Base learning rate (bottleneck layers). With backbone × 1, over the "
                             "default 15 epochs on MNIST-C fog (digit CNN): 0.003 → 15.7 % error, the authors' "
                             "VisDA 1e-3 × 0.1 → BN-1's 61.2 %, 0.01 → 82.2 % (BENCHMARKS.md, issue 16 second pass); "
                             "use 1e-3 and backbone_lr_mult 0.1 for an ImageNet-pretrained backbone.")
    backbone_lr_mult: float = Field(1.0, ge=0, le=1, description="Backbone lr = lr × this (VisDA reference: 0.1).")
    K: int = Field(5, ge=1, le=100, description="Nearest neighbours per sample.")
    KK: int = Field(5, ge=0, le=100, description="Expanded neighbours: nearest neighbours of each neighbour "
                    "(0 turns the expanded term off).")
    r: float = Field(0.1, ge=0, le=1, description="Affinity of non-reciprocal and expanded neighbours.")
    reciprocal_affinity: float = Field(
        0.1, ge=0, le=1, description="Affinity of reciprocal neighbours. The paper says 1; the authors' code "
        "(train_tar.py) ends up with r for every neighbour, because `weight_kk.fill_(0.1)` writes through the "
        "expanded view of `weight`. Their published results come from that code.")
    epsilon: float = Field(1e-5, gt=0)


@describe("aad", "sfda", "AaD (Yang et al., NeurIPS 2022): attract the predictions of each sample's K nearest "
          "neighbours (feature and score memory banks over the target set) and disperse the predictions of "
          "the other samples of the batch, with weight alpha·(1 + 10·t/T)^-beta. Updates the feature "
          "extractor, classifier frozen. Defaults: K 3 (the authors' Office-31/Office-Home value), beta 2 "
          "(theirs: 1 Office-31, 5 VisDA) and lr 0.003 with their backbone × 0.1, measured on digits "
          "(BENCHMARKS.md, issue 16 third pass); 15 epochs, plus one forward pass over the target to fill "
          "the banks.", epochs=15, forward_passes_once=1,
          updates="all_but_classifier")
class AaDParams(SFDAParams):
    lr: LearningRate = Field(0.003, description="Base learning rate (bottleneck layers). The authors' 1e-3 "
                             "(with K 5, beta 5) leaves a digit CNN on MNIST-C fog at BN-1's error (57.7 against "
                             "58.8 %); 0.01 with backbone × 1 and constant dispersion ends at 78.3 %.")
    backbone_lr_mult: float = Field(0.1, ge=0, le=1, description="Backbone lr = lr × this (the authors' 0.1; "
                                    "on MNIST→USPS a backbone at the full lr cost 6–8 points).")
    K: int = Field(3, ge=1, le=100, description="Nearest neighbours attracted per sample (authors: 3 on "
                   "Office-31/Office-Home, 5 on VisDA).")
    alpha: float = Field(1.0, ge=0, description="Weight of the dispersion term at the start.")
    beta: float = Field(2.0, ge=0, description="Decay exponent of the dispersion weight "
                        "alpha·(1 + 10·t/T)^-beta (authors: 1 on Office-31, 5 on VisDA, constant on Office-Home). "
                        "With 5 it is gone after the first of 15 epochs and, from a poor source, attraction alone "
                        "keeps its errors.")
    alpha_decay: bool = Field(True, description="Decay the dispersion weight over the run (authors: on for "
                              "Office-31 and VisDA, off for Office-Home).")
