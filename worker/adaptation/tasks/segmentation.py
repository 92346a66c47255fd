"""Segmentation: the model outputs per-pixel logits (N, num_classes, H, W). A prediction keeps, per image,
the argmax mask (uint8, at the model's resolution), its mean pixel entropy and max-probability and its soft
class proportions (Bateson's τ̂): enough to score against masks and to watch for a mask collapse (e.g.
everything background) without keeping N×K×H×W probabilities."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import metrics as M
from .. import segmentation as S
from ..errors import AdaptationError
from ..examples import pick_masks
from ..models.export import recalibrate_batch_norm


class Segmentation:
    name = "segmentation"
    masks = True
    pad_mixed_sizes = False

    def check_output(self, out: torch.Tensor, num_classes: int) -> None:
        if out.ndim != 4 or out.shape[1] != num_classes:
            raise AdaptationError("num_classes_mismatch",
                                  f"the model outputs {list(out.shape)}, expected (N, {num_classes}, H, W)")

    def check_labels(self, labels: np.ndarray, num_classes: int) -> None:
        if labels.ndim != 3:
            raise AdaptationError("invalid_masks", f"segmentation eval_data needs one mask per image (N×H×W), "
                                  f"got labels of shape {list(labels.shape)}")
        values = np.unique(labels)
        bad = values[(values >= num_classes) & (values != S.IGNORE_INDEX)]
        if len(bad) or values.min() < 0:
            raise AdaptationError("label_out_of_range", f"mask values must lie in 0..{num_classes - 1} "
                                  f"(255 = ignore)", {"found": [int(v) for v in bad[:10]]})

    def prediction(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = out.float().softmax(1)
        conf, mask = probs.max(1)
        return {"mask": mask.to(torch.uint8), "entropy": S.pixel_entropy(probs),
                "confidence": conf.mean(dim=(1, 2)), "proportions": S.soft_proportions(probs)}

    def check_preprocess(self, pre: dict) -> None:
        pass  # any size, channels and normalisation the model takes

    def signal_classes(self, num_classes: int) -> int:
        return num_classes

    def collapse_signal(self, out: torch.Tensor, num_classes: int) -> torch.Tensor:
        return out.argmax(1).flatten()

    def collapse_counts(self, signal: torch.Tensor, n_images: int, bins: int) -> torch.Tensor:
        return S.class_presence(signal.view(n_images, -1), bins)

    def step_entropy(self, out: torch.Tensor) -> torch.Tensor:
        return S.pixel_entropy(out.float().softmax(1)).mean()

    def summary(self, predictions: dict, num_classes: int) -> dict:
        hist = torch.bincount(predictions["mask"].flatten().long(), minlength=num_classes)[:num_classes]
        total = max(int(hist.sum()), 1)
        return {
            "mean_entropy": float(predictions["entropy"].mean()),
            "mean_max_probability": float(predictions["confidence"].mean()),
            "predicted_class_proportions": [int(v) / total for v in hist.tolist()],
            "soft_class_proportions": predictions["proportions"].mean(0).tolist(),
            "predicted_class_entropy": M.histogram_entropy(hist),
            "predicted_class_entropy_max": math.log(num_classes),
            # images whose mask holds one class only (all background, typically): a collapse shows here first
            "single_class_images": int(sum(len(torch.unique(m)) == 1 for m in predictions["mask"])),
            # what the collapse guard watches: per class, the images whose mask holds it (S.class_presence)
            "class_presence_entropy": M.histogram_entropy(sum(
                (S.class_presence(predictions["mask"][i:i + 256], num_classes)
                 for i in range(0, len(predictions["mask"]), 256)), torch.zeros(num_classes, dtype=torch.long))),
        }

    def collapse_score(self, summary: dict) -> float:
        return summary["class_presence_entropy"]

    def headline(self, source: dict, after: dict, before_summary: dict, after_summary: dict) -> dict:
        return {"entropy_before": before_summary["mean_entropy"],
                "entropy_after": after_summary["mean_entropy"],
                "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
                "agreement_with_source": float((source["mask"] == after["mask"]).float().mean()),
                "estimated_accuracy_after": after_summary["mean_max_probability"],
                "class_proportions_before": before_summary["predicted_class_proportions"],
                "class_proportions_after": after_summary["predicted_class_proportions"]}

    def evaluate(self, predictions: dict, labels: np.ndarray, num_classes: int) -> dict:
        cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for start in range(0, len(labels), 64):
            pred = predictions["mask"][start:start + 64]
            target = torch.from_numpy(labels[start:start + 64])
            if pred.shape[-2:] != target.shape[-2:]:  # scored at the masks' own resolution
                pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0]
            cm += S.confusion(pred.long(), target, num_classes)
        scores = S.scores_from_confusion(cm)
        return {**scores, "confusion_matrix": cm.tolist()}

    def eval_headline(self, before: dict, after: dict) -> dict:
        return {"miou_before": before["miou"], "miou_after": after["miou"],
                "pixel_accuracy_before": before["pixel_accuracy"], "pixel_accuracy_after": after["pixel_accuracy"],
                "dice_before": before["dice"], "dice_after": after["dice"]}

    def online(self, signals: torch.Tensor, labels: np.ndarray) -> dict:
        per_image = labels[0].size
        if len(signals) % per_image or len(signals) > labels.size:  # resized by preprocess: not comparable
            return {"pixel_accuracy": None, "num_images": None}
        flat = torch.from_numpy(labels.reshape(-1))[: len(signals)]
        keep = flat != S.IGNORE_INDEX
        return {"pixel_accuracy": float((signals[keep] == flat[keep]).float().mean()) if keep.any() else None,
                "num_images": len(signals) // per_image}

    def examples(self, data, before: dict, after: dict, labelled: bool) -> dict:
        return pick_masks(data, before, after, labelled, num_classes=before["proportions"].shape[1])

    def recalibrate(self, model, batches, autocast) -> int:
        return recalibrate_batch_norm(model, batches, autocast)
