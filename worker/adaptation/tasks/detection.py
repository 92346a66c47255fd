"""Detection: torchvision-style detectors, whose eval-mode forward on a batch returns one dict per image.

Interfaces (shared with the data readers, the examples and the dashboard; keep them):

- Model output (manifest output form "detections"): `model(x)` in eval mode, x a float N×3×H×W batch of
  [0, 1] pixels (the detection preprocess is the identity: size None, mean 0, std 1; the detector's own
  transform resizes by `min_size`/`max_size` and normalises by `image_mean`/`image_std`, arch_kwargs),
  returns a list of N dicts {"boxes": K×4 float xyxy in the input's pixels, "scores": K, "labels": K int64}.
- Ground truth of a labelled set (`ImageSet.labels` of eval_data): a dict of numpy arrays exactly as the
  npz gives them, read without pickle: `boxes` float32 M×4 xyxy in the pixel coordinates of the image as
  the ImageSet yields it (npz: as uploaded; an archive of several sizes is padded at the bottom and right
  to the largest, `pad_mixed_sizes`, so its boxes keep their pixels; with a `preprocess.size` it would be
  resized and its reader scales the boxes with it), `labels` int64 M (the model's label ids), `image_index`
  int64 M (the box's image, in stored order). The readers (`data/boxes.py`, the check the API runs at
  submit: app/checks/boxes.py) refuse boxes that are not finite or of zero or negative size
  (`invalid_box`), out of the image (`box_out_of_image`), and malformed arrays or image indices out of range
  (`invalid_detection_labels`); `check_labels` refuses label ids outside 0..num_classes-1
  (`label_out_of_range`).
  An image with no box is a labelled image without objects.
- Predictions kept per image (`prediction`, what `runner.predict` returns and `evaluate`, `summary`,
  `headline`, `examples(data, before, after, labelled)` receive): a Python list with one dict per image in
  stored order, {"boxes": K×4 float32, "scores": K float32, "labels": K int64} on the CPU, in the same
  coordinates as the ground truth, every detection the model returned (its own score threshold and
  detections_per_img apply); the runner concatenates the batches' lists. `examples`: detection_examples.py
  (thumbnails with the confident boxes before/after and the ground truth).
- num_classes is torchvision's: for Faster R-CNN and SSD (`background_label` 0 in the manifest) it counts
  the background at label 0, object classes are 1..num_classes-1 (COCO: 91); for FCOS and RetinaNet every
  label 0..num_classes-1 is an object class (torchvision's COCO checkpoints still use 91 with 0 unused, so
  COCO category ids map the same way onto every family). The digit canvases use label = 1 + digit and
  num_classes 11 for every family.

Label-free signals: a detection "counts" when its score is at least CONFIDENT (0.5). The collapse guard
watches, per step, the labels of counted detections plus one "no detection" bin per image without any
(`signal_classes` = num_classes + 1): detections vanishing or one class taking over both drive the entropy
of that histogram down, and the guard rolls back as for classifiers. BatchNorm: detectors keep their
backbone statistics frozen (FrozenBatchNorm2d, models/torchvision_det.py); `recalibrate` re-estimates only
live BatchNorm2d layers (SSDlite, the `_v2` heads) and layers `bn_adapt` unfroze, which it freezes back."""
from __future__ import annotations

import torch

from .. import boxes as B
from .. import detection_examples
from ..errors import AdaptationError
from ..models.export import recalibrate_batch_norm
from ..models.torchvision_det import freeze_bn

CONFIDENT = 0.5  # a detection at or above this score counts in the label-free summaries and the guard


class Detection:
    name = "detection"
    masks = False  # labels are boxes (npz arrays; COCO JSON beside an archive's images: data/archives/coco.py)
    pad_mixed_sizes = True  # real photos differ in size; the detector resizes inside, boxes keep their pixels

    def check_preprocess(self, pre: dict) -> None:
        if pre["size"] is not None or any(v != 0 for v in pre["mean"]) or any(v != 1 for v in pre["std"]):
            raise AdaptationError(
                "invalid_preprocess", "detectors resize and normalise inside (arch_kwargs min_size, max_size, "
                "image_mean, image_std): preprocess must keep the input as it is (size null, mean 0, std 1), "
                "or the boxes would not be in the image's pixels",
                {"size": pre["size"], "mean": pre["mean"], "std": pre["std"]})
        if pre["channels"] != 3:
            raise AdaptationError("invalid_preprocess", "detectors take 3 channels", {"channels": pre["channels"]})

    def check_output(self, out, num_classes: int) -> None:
        if not isinstance(out, (list, tuple)) or not all(
                isinstance(o, dict) and {"boxes", "scores", "labels"} <= set(o) for o in out):
            raise AdaptationError("num_classes_mismatch", "a detection model must return, in eval mode, one dict "
                                  "{boxes, scores, labels} per image (torchvision's detectors do)",
                                  {"got": type(out).__name__})
        labels = torch.cat([o["labels"].flatten() for o in out]) if out else torch.zeros(0)
        if len(labels) and int(labels.max()) >= num_classes:
            raise AdaptationError("num_classes_mismatch", f"the model predicts label {int(labels.max())}, "
                                  f"outside 0..{num_classes - 1}", {"num_classes": num_classes})

    def check_labels(self, labels, num_classes: int) -> None:
        if not isinstance(labels, dict) or not {"boxes", "labels", "image_index"} <= set(labels):
            raise AdaptationError("detection_labels_missing", "detection eval_data needs boxes: npz 'boxes', "
                                  "'labels', 'image_index' (or COCO JSON in an archive)")
        lab = labels["labels"]
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise AdaptationError("label_out_of_range", f"box labels must lie in 0..{num_classes - 1}",
                                  {"min": int(lab.min()), "max": int(lab.max())})

    def prediction(self, out) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": o["boxes"].detach().float().cpu(), "scores": o["scores"].detach().float().cpu(),
                 "labels": o["labels"].detach().long().cpu()} for o in out]

    def signal_classes(self, num_classes: int) -> int:
        return num_classes + 1

    def collapse_signal(self, out, num_classes: int) -> torch.Tensor:
        parts = []
        for o in out:
            keep = o["labels"][o["scores"] >= CONFIDENT]
            parts.append(keep.long() if len(keep) else torch.full((1,), num_classes, dtype=torch.long,
                                                                  device=o["labels"].device))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def collapse_counts(self, signal: torch.Tensor, n_images: int, bins: int) -> torch.Tensor:
        return torch.bincount(signal, minlength=bins)[:bins]

    def step_entropy(self, out) -> torch.Tensor:
        scores = [o["scores"].float() for o in out]
        s = torch.cat(scores) if scores else torch.zeros(0)
        return B.binary_entropy(s).mean() if len(s) else torch.zeros(())

    def summary(self, predictions: list[dict], num_classes: int) -> dict:
        return B.summary(predictions, num_classes, CONFIDENT)

    def collapse_score(self, summary: dict) -> float:
        return summary["predicted_class_entropy"]

    def headline(self, source: list[dict], after: list[dict], before_summary: dict, after_summary: dict) -> dict:
        return {"entropy_before": before_summary["mean_entropy"],
                "entropy_after": after_summary["mean_entropy"],
                "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
                "agreement_with_source": B.agreement(after, source, CONFIDENT),
                "estimated_accuracy_after": after_summary["mean_confident_score"],
                "detections_per_image_before": before_summary["detections_per_image"],
                "detections_per_image_after": after_summary["detections_per_image"],
                "mean_score_before": before_summary["mean_score"],
                "mean_score_after": after_summary["mean_score"]}

    def evaluate(self, predictions: list[dict], labels: dict, num_classes: int) -> dict:
        return B.mean_average_precision(predictions, labels)

    def eval_headline(self, before: dict, after: dict) -> dict:
        return {"map_before": before["map"], "map_after": after["map"],
                "map50_before": before["map50"], "map50_after": after["map50"]}

    def online(self, signals: torch.Tensor, labels) -> dict:
        # The online signals are hard labels of counted detections, not boxes: no online mAP.
        return {"map": None, "num_images": None}

    def examples(self, data, before, after, labelled: bool) -> dict:
        return detection_examples.pick(data, before, after, labelled, CONFIDENT)

    def recalibrate(self, model, batches, autocast) -> int:
        seen = recalibrate_batch_norm(model, batches, autocast)
        freeze_bn(model, only_marked=True)  # layers bn_adapt unfroze go back to FrozenBatchNorm2d
        return seen

