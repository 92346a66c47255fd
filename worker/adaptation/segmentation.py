"""Segmentation losses and metrics as pure functions over per-pixel probabilities N×K×H×W.

The class-ratio prior loss is Bateson et al.'s (MedIA 2022, "Source-free domain adaptation for image
segmentation"; their `EntKLProp`): class-weighted Shannon entropy of the pixel softmax plus
KL(τ̂ ‖ τ_prior), where τ̂ is the image's soft class proportion — pixel probabilities divided by their
per-pixel maximum, summed over pixels, normalised over classes."""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

IGNORE_INDEX = 255
EPS = 1e-10
PRESENT_SHARE = 0.005  # a class counts as present in a mask from this share of its pixels (speckle does not)


def soft_proportions(probs: torch.Tensor) -> torch.Tensor:
    """N×K×H×W probabilities → N×K soft class proportions (each row sums to 1). Dividing by the per-pixel
    maximum makes a confident pixel count as one whole pixel of its class (Bateson's `norm_soft_size`)."""
    sharpened = probs / (probs.amax(dim=1, keepdim=True) + EPS)
    sizes = sharpened.sum(dim=(2, 3))
    return sizes / (sizes.sum(dim=1, keepdim=True) + EPS)


def weighted_entropy(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of −Σ_c w_c p_c log p_c (their `loss_se`: normalised by Σ p = the pixel count)."""
    ent = -(probs * (probs + EPS).log()) * weights.view(1, -1, 1, 1)
    return ent.sum() / (probs.sum() + EPS)


def kl_to_prior(est: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Mean over images of KL(est ‖ prior), both N×K (their `loss_cons_prior`, divided by the batch size).
    A class with prior 0 pushes its estimated proportion to 0."""
    return (est * ((est + EPS).log() - (prior + EPS).log())).sum() / est.shape[0]


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-image mean pixel entropy, N."""
    return -(probs * (probs + EPS).log()).sum(dim=1).mean(dim=(1, 2))


def class_presence(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N masks (N×H×W, or N×P flattened; values 0..num_classes-1) -> per class, how many of them hold it on at
    least PRESENT_SHARE of their pixels (one pixel at least). A mask collapse (everything background) leaves one
    class in every image; the pixel histogram cannot tell that from healthy masks, which are mostly background
    too (digit canvases: ~87 % background, pixel-histogram entropy ~0.6 nats, within reach of any threshold)."""
    flat = masks.reshape(len(masks), -1).long()
    n, pixels = flat.shape
    offsets = torch.arange(n, device=flat.device)[:, None] * num_classes
    counts = torch.bincount((flat + offsets).flatten(), minlength=n * num_classes).view(n, num_classes)
    return (counts >= max(1, math.ceil(PRESENT_SHARE * pixels))).sum(0)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts (rows = truth, columns = prediction), pixels labelled 255 ignored (torchmetrics)."""
    return multiclass_confusion_matrix(pred.flatten(), target.flatten().long(), num_classes,
                                       ignore_index=IGNORE_INDEX, validate_args=False)


def scores_from_confusion(cm: torch.Tensor) -> dict:
    """mIoU over classes that occur (in truth or prediction), pixel accuracy, mean Dice over the foreground
    classes that occur (class 0 is background), per-class IoU (None where a class never occurs)."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    dice = torch.where(present, 2 * tp / (gt + pr).clamp(min=1), torch.nan)
    fg = present.clone()
    fg[0] = False
    return {"miou": float(iou[present].mean()) if present.any() else None,
            "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else None,
            "dice": float(dice[fg].mean()) if fg.any() else None,
            "iou_per_class": [None if torch.isnan(v) else float(v) for v in iou]}
