"""Methods made for detection: source-free domain-adaptive object detection (SF-DAOD) on torchvision
detectors. Every one trains the student detector on its own pseudo-labels with torchvision's losses (the
detector in train mode, given targets) and several epochs over the target set; the exported model is the
teacher where there is one (what SF-DAOD papers evaluate). Augmentations are photometric only, so boxes stay
where they are: weak = the image (optionally flipped with its boxes), strong = colour jitter, grayscale,
Gaussian blur and random erasing (Unbiased Teacher's recipe, which simple-SFOD and TITAN reuse).

BatchNorm: torchvision's detectors freeze their backbone BatchNorm (FrozenBatchNorm2d); no method here
unfreezes it while training. `bn_adapt` on a detector re-estimates those frozen statistics on the target
(AdaBN: same layers, same keys, new running mean/var), and `fixed_pseudo_labels` starts from that model,
as simple-SFOD does.

Schedules: the papers train for a number of iterations on Cityscapes-sized sets; a job's default is 10
passes over its target set (`options.epochs` changes it)."""
from __future__ import annotations

from pydantic import Field

from . import CollapseGuard, LearningRate, Momentum, WeightDecay, describe

SIMPLE_SFOD = ("Hao, Forest, Fink, 'Simplifying Source-Free Domain Adaptation for Object Detection: Effective "
               "Self-Training Strategies and Performance Insights', ECCV 2024; Faster R-CNN, Cityscapes→Foggy "
               "Cityscapes")


class _SelfTraining(CollapseGuard):
    """What every detection self-training method takes."""

    score_threshold: float = Field(0.8, ge=0, le=1, description="A teacher detection with at least this score "
                                   "becomes a pseudo-label (simple-SFOD: 0.8).")
    lr: LearningRate = Field(0.0025, le=1.0, description="SGD learning rate, momentum 0.9 (simple-SFOD: 0.0025).")
    momentum: Momentum = 0.9
    weight_decay: WeightDecay = Field(1e-4, le=1.0, description="detectron2's default 1e-4.")
    flip: bool = Field(True, description="Weak augmentation: flip each image and its pseudo-boxes horizontally "
                       "with p = 0.5 (the authors'; turn off where a flip changes the class, e.g. digits).")
    strong_augment: bool = Field(True, description="The student sees the strong view (colour jitter, grayscale, "
                                 "blur, random erasing); off: the weak view.")
    adapt_batch_norm: bool = Field(False, description="Before training, re-estimate the detector's frozen "
                                   "BatchNorm statistics on the target (AdaBN, what `bn_adapt` exports) and start "
                                   "from that model (teacher and student alike).")


class _MeanTeacher(_SelfTraining):
    ema_keep: float = Field(0.9996, ge=0, lt=1, description="Teacher ← keep·teacher + (1−keep)·student after "
                            "each step (simple-SFOD: 0.9996 over its ~thousands of iterations; a short job on a "
                            "small set needs a smaller keep rate to move at all).")


@describe("mean_teacher", "sfda", "Mean teacher for source-free detection, simple-SFOD's tuned recipe "
          f"({SIMPLE_SFOD}): the EMA teacher labels the weak view (detections with score ≥ 0.8), the student "
          "learns them on the strong view with the detector's own losses (SGD lr 0.0025), the teacher follows "
          "the student by EMA (keep 0.9996). Exported: the teacher.",
          updates="all", tasks=("detection",), epochs=10, forward_passes_per_epoch=2)
class MeanTeacherParams(_MeanTeacher):
    pass


@describe("titan", "sfda", "TITAN (Ashraf & Bashir, 'Query-Token based Domain Adaptive Adversarial Learning', "
          "ICCV 2025; lineage A²SFOD, Chu et al., AAAI 2023): before training, M stochastic passes of the "
          "source detector (Monte-Carlo dropout on its backbone features) give each target image a detection "
          "variance v = v_box · v_score; images ranked by v are split at the quantile σ into source-similar "
          "(easy: high variance, high recall) and source-dissimilar (hard). Training is the mean teacher above "
          "plus an adversarial alignment of the two subsets: a domain discriminator on the student's pooled "
          "backbone features (the global average of every FPN level, concatenated: torchvision's CNN detectors "
          "have no query tokens, which are DETR's) learns easy vs hard through a gradient-reversal layer, so the "
          "backbone learns features in which hard images look easy. Exported: the teacher.",
          updates="all", tasks=("detection",), epochs=10, forward_passes_per_epoch=2, forward_passes_once=11)
class TitanParams(_MeanTeacher):
    mc_passes: int = Field(10, ge=2, le=64, description="Stochastic passes M of the source model per image.")
    mc_dropout: float = Field(0.1, gt=0, lt=1, description="Dropout rate on the backbone's feature maps during "
                              "the stochastic passes (torchvision's detectors have no dropout of their own).")
    split_quantile: float = Field(0.5, gt=0, lt=1, description="σ: images whose variance rank r/N is at least σ "
                                  "are easy; 0.5 splits at the median (the paper tunes σ per benchmark).")
    adversarial_weight: float = Field(0.1, ge=0, le=10, description="Weight λ of the discriminator's loss (0.1, "
                                      "the usual weight of image-level adversarial alignment since DA-Faster).")
    grl_coefficient: float = Field(1.0, ge=0, le=10, description="Gradient-reversal coefficient.")


@describe("fixed_pseudo_labels", "sfda", "Fixed pseudo-labels from the BN-adapted source model, simple-SFOD's "
          f"strong baseline ({SIMPLE_SFOD}): the source detector's frozen BatchNorm statistics are re-estimated "
          "on the target (AdaBN), its detections with score ≥ 0.8 on every target image are kept once, and that "
          "model is trained on them (strong view, SGD) for the job's epochs; no teacher. Exported: the trained model.",
          updates="all", tasks=("detection",), epochs=10, forward_passes_per_epoch=1, forward_passes_once=2)
class FixedPseudoLabelParams(_SelfTraining):
    adapt_batch_norm: bool = Field(True, description="Re-estimate the frozen BatchNorm statistics on the target "
                                   "before labelling (simple-SFOD's BN-adapted source model); off: pseudo-labels of "
                                   "the source model as is.")
