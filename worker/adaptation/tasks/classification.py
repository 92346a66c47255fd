"""Classification: the model outputs logits (N, num_classes); predictions are softmax probabilities."""
from __future__ import annotations

import numpy as np
import torch

from .. import estimation as E
from .. import metrics as M
from ..errors import AdaptationError
from ..examples import pick as pick_examples
from ..models.export import recalibrate_batch_norm


class Classification:
    name = "classification"
    masks = False
    pad_mixed_sizes = False

    def check_output(self, out: torch.Tensor, num_classes: int) -> None:
        if out.ndim != 2 or out.shape[1] != num_classes:
            raise AdaptationError("num_classes_mismatch",
                                  f"the model outputs {list(out.shape)}, expected (N, {num_classes})")

    def check_labels(self, labels: np.ndarray, num_classes: int) -> None:
        if labels.min() < 0 or labels.max() >= num_classes:
            raise AdaptationError("label_out_of_range", f"eval_data labels must lie in 0..{num_classes - 1}",
                                  {"min": int(labels.min()), "max": int(labels.max())})

    def prediction(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().softmax(1)

    def check_preprocess(self, pre: dict) -> None:
        pass  # any size, channels and normalisation the model takes

    def signal_classes(self, num_classes: int) -> int:
        return num_classes

    def collapse_signal(self, out: torch.Tensor, num_classes: int) -> torch.Tensor:
        return out.argmax(1)

    def collapse_counts(self, signal: torch.Tensor, n_images: int, bins: int) -> torch.Tensor:
        return torch.bincount(signal, minlength=bins)[:bins]

    def step_entropy(self, out: torch.Tensor) -> torch.Tensor:
        return M.entropy(out.softmax(1)).mean()

    def summary(self, predictions: torch.Tensor, num_classes: int) -> dict:
        return M.prediction_summary(predictions, num_classes)

    def collapse_score(self, summary: dict) -> float:
        return summary["predicted_class_entropy"]

    def headline(self, source: torch.Tensor, after: torch.Tensor, before_summary: dict,
                 after_summary: dict) -> dict:
        return {"entropy_before": before_summary["mean_entropy"],
                "entropy_after": after_summary["mean_entropy"],
                "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
                "agreement_with_source": M.agreement(after, source),
                **E.accuracy_estimate(after)}

    def evaluate(self, predictions: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict:
        return M.labelled_summary(predictions, torch.from_numpy(labels), num_classes)

    def eval_headline(self, before: dict, after: dict) -> dict:
        return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"]}

    def online(self, signals: torch.Tensor, labels: np.ndarray) -> dict:
        seen = len(signals)
        return {"accuracy": float((signals == torch.from_numpy(labels[:seen])).float().mean()), "num_images": seen}

    def examples(self, data, before: torch.Tensor, after: torch.Tensor, labelled: bool) -> dict:
        return pick_examples(data, before, after, labelled)

    def recalibrate(self, model, batches, autocast) -> int:
        return recalibrate_batch_norm(model, batches, autocast)
