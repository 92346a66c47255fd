"""The task interface: the runner's task-specific parts, behind one small protocol."""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn


class TaskEngine(Protocol):
    name: str
    masks: bool  # labels are per-pixel masks (an archive's images/ + masks/), not one class per image
    # Archives of images of several sizes without a preprocess size: padded at the bottom and right to the
    # largest (True: coordinates keep their pixels, as boxes need) or refused (False: set preprocess.size).
    pad_mixed_sizes: bool

    def check_preprocess(self, pre: dict) -> None:
        """Raise AdaptationError for a resolved preprocess (size, channels, mean, std) this task cannot use."""

    def check_output(self, out: torch.Tensor, num_classes: int) -> None:
        """Input check: raise AdaptationError when the model's output on a preprocessed batch is not
        this task's output form."""

    def check_labels(self, labels: np.ndarray, num_classes: int) -> None:
        """Raise AdaptationError for eval labels this task cannot score."""

    def prediction(self, out: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | list:
        """A model's raw output on a batch -> the per-sample prediction kept for scoring: a tensor or a dict
        of tensors, each with the batch as its first dimension, or a list with one item per sample (the
        runner concatenates them)."""

    def signal_classes(self, num_classes: int) -> int:
        """How many bins the collapse guard's histogram of `collapse_signal` values has."""

    def collapse_signal(self, out: torch.Tensor, num_classes: int) -> torch.Tensor:
        """A step's output -> what the collapse guard watches and online accuracy scores (hard labels in
        0..signal_classes-1)."""

    def collapse_counts(self, signal: torch.Tensor, n_images: int, bins: int) -> torch.Tensor:
        """A step's `collapse_signal` (of `n_images` images) -> the histogram (`bins` = signal_classes) it
        adds to the collapse guard's window; `collapse_score` is the entropy of the same kind of histogram."""

    def step_entropy(self, out: torch.Tensor) -> torch.Tensor:
        """A step's output -> the mean prediction entropy logged per step."""

    def summary(self, predictions: torch.Tensor, num_classes: int) -> dict:
        """Label-free summary of a model's predictions on a set (`metrics.target.before/after`)."""

    def collapse_score(self, summary: dict) -> float:
        """The number the collapse guard compares with its threshold, from a summary."""

    def headline(self, source: torch.Tensor, after: torch.Tensor, before_summary: dict,
                 after_summary: dict) -> dict:
        """The label-free top-level metrics of a job."""

    def evaluate(self, predictions: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict:
        """Scores against labels (`metrics.eval.before/after`; its `accuracy` is the headline)."""

    def eval_headline(self, before: dict, after: dict) -> dict:
        """The stable top-level keys of the labelled scores (e.g. accuracy_before/after, miou_before/after)."""

    def online(self, signals: torch.Tensor, labels: np.ndarray) -> dict:
        """Scores the online predictions (collapse signals of each step, in stored order) against the
        labels the target data happens to carry."""

    def examples(self, data, before, after, labelled: bool) -> dict | None:
        """A few images of `data` with the predictions `before`/`after` adaptation, for people to look at
        (the `examples.json` artifact, kept small); None: this task shows none."""

    def recalibrate(self, model: nn.Module, batches: Iterable[torch.Tensor], autocast: Callable) -> int:
        """Re-estimate the exported model's normalisation statistics on the target; returns batches used."""
