"""Label-free accuracy estimates and the `auto` method's selection scores. Pure functions over probability
tensors (N × C, rows sum to one) of models on the same unlabelled target images.

- `average_confidence`: the mean max-probability (Hendrycks & Gimpel 2017), the baseline every paper below
  compares against. Entropy-minimising adaptation makes models confident whether right or wrong, so it
  overestimates after adaptation (the issue's SHOT example: 88 % estimated, 69 % true).
- `atc`: average thresholded confidence (Garg et al., ICLR 2022): the fraction of target images whose
  confidence exceeds a threshold fitted where labels exist, so that the fraction above it there equals the
  accuracy there. Here the labelled set is the job's small labelled target set, when it has one.
- `ensemble_agreement`: the agreement of a model with the majority vote of a set of models (Jiang et al.,
  ICLR 2022, "Assessing generalization of SGD via disagreement"; Chen et al., NeurIPS 2021, self-training
  ensembles): an estimate of its accuracy when the ensemble is more often right than any member.
- `soft_neighborhood_density`: SND (Saito et al., ICCV 2021), a label-free score made to pick among
  adapted models: the entropy of each target sample's soft neighbour distribution in prediction space;
  higher when predictions form dense clusters. A score, not an accuracy."""
from __future__ import annotations

import torch

from .metrics import mean_max_probability

SND_TEMPERATURE = 0.05   # Saito et al.'s τ
SND_MAX_IMAGES = 2_000   # the N×N similarity matrix is computed on a fixed subsample


def average_confidence(probs: torch.Tensor) -> float:
    return mean_max_probability(probs)


def class_balance_bound(probs: torch.Tensor, prior: torch.Tensor | None = None) -> float:
    """An upper bound on accuracy from the predicted-class histogram alone: a class predicted for a
    fraction p_c of the images can be right on at most min(p_c, q_c) of them, q the true class
    frequencies; q is `prior`, or uniform when unknown (an assumption: roughly balanced targets). A model
    that predicts one class for everything (a collapsed source under a corruption) is bounded by 1/C."""
    num_classes = probs.shape[1]
    p = torch.bincount(probs.argmax(1), minlength=num_classes)[:num_classes].double() / len(probs)
    q = torch.full_like(p, 1.0 / num_classes) if prior is None else prior.double()
    return float(torch.minimum(p, q).sum())


def bounded_confidence(probs: torch.Tensor, prior: torch.Tensor | None = None) -> float:
    """The mean confidence, capped by `class_balance_bound`."""
    return min(average_confidence(probs), class_balance_bound(probs, prior))


def atc_threshold(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The confidence t at which the fraction of `probs` above t equals their accuracy on `labels`
    (ATC with the max-confidence score function)."""
    conf = probs.max(1).values.sort().values
    acc = float((probs.argmax(1) == labels).float().mean())
    k = int(round((1.0 - acc) * len(conf)))  # that many below the threshold
    return float(conf[min(k, len(conf) - 1)]) if k > 0 else float(conf[0]) - 1e-6


def atc(probs: torch.Tensor, threshold: float) -> float:
    return float((probs.max(1).values > threshold).float().mean())


def majority_vote(probs_list: list[torch.Tensor]) -> torch.Tensor:
    """Hard majority vote per image (ties go to the class with the higher summed probability)."""
    num_classes = probs_list[0].shape[1]
    votes = torch.zeros_like(probs_list[0])
    for p in probs_list:
        votes += torch.nn.functional.one_hot(p.argmax(1), num_classes).to(votes.dtype)
    return (votes + 1e-3 * torch.stack(probs_list).mean(0)).argmax(1)


def ensemble_agreement(probs: torch.Tensor, ensemble: list[torch.Tensor]) -> float:
    return float((probs.argmax(1) == majority_vote(ensemble)).float().mean())


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = SND_TEMPERATURE,
                              max_images: int = SND_MAX_IMAGES, seed: int = 0) -> float:
    p = probs
    if len(p) > max_images:
        p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(seed))[:max_images]]
    f = torch.nn.functional.normalize(p.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    q = torch.softmax(sim / temperature, 1)
    return float(-(q * q.clamp_min(1e-12).log()).sum(1).mean())


def selection_scores(probs_list: list[torch.Tensor], criterion: str) -> list[float]:
    """One label-free score per candidate (higher is better) under `criterion`."""
    if criterion == "agreement":
        return [ensemble_agreement(p, probs_list) for p in probs_list]
    if criterion == "confidence":
        return [average_confidence(p) for p in probs_list]
    if criterion == "bounded_confidence":
        return [bounded_confidence(p) for p in probs_list]
    if criterion == "snd":
        return [soft_neighborhood_density(p) for p in probs_list]
    raise ValueError(f"unknown selection criterion {criterion!r}")


def choose(methods: list[str], probs_list: list[torch.Tensor], criterion: str) -> dict:
    """`auto`'s pick: every candidate's score under `criterion` and the best one (the first on ties)."""
    scores = selection_scores(probs_list, criterion)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return {"candidates": [{"method": m, "score": s} for m, s in zip(methods, scores)],
            "selected_method": methods[best], "selected_index": best, "criterion": criterion}


# The label-free accuracy estimate every job reports, and its typical error: the mean absolute error over
# the digit benchmark's adapted models and distilled students, 45 (model, target) pairs on 9 targets
# (BENCHMARKS.md, "Label-free accuracy estimates"; benchmarks/multisource_benchmark.py). A fraction,
# like the accuracy. Against the plain mean confidence it changes little for adapted models (12.6 points)
# and much for models that collapsed or were not adapted (58.1 -> 4.2 points on 17 source models).
ESTIMATOR = "bounded_confidence"
ESTIMATOR_MEAN_ABS_ERROR = 0.132


def accuracy_estimate(probs: torch.Tensor) -> dict:
    return {"estimated_accuracy_after": bounded_confidence(probs), "estimator": ESTIMATOR,
            "estimated_accuracy_error": ESTIMATOR_MEAN_ABS_ERROR}


def entropy_note(entropy_before: float | None, entropy_after: float | None, recalibrated_batches: int,
                 distilled: bool = False) -> str | None:
    """Why the reported entropy can rise after an entropy-minimising method: both numbers are of models
    in eval mode; the adapted one with BatchNorm statistics re-estimated over the whole target, which
    the method never saw while it minimised entropy on batch statistics (the per-step entropy in
    history.json is that one). `distilled`: entropy_after is a student's, another network than the
    source entropy_before is of."""
    if entropy_before is None or entropy_after is None or entropy_after <= entropy_before:
        return None
    if distilled:
        return ("entropy_after > entropy_before: entropy_before is the selected source model's, entropy_after "
                "the student's, another network trained by distillation and on the labelled images, not by "
                "minimising entropy; a less confident student is not a worse one. Compare accuracies (eval_data) "
                "or estimated_accuracy_after instead.")
    if recalibrated_batches:
        return ("entropy_after > entropy_before: entropy_after is the exported model's in eval mode, with "
                "BatchNorm statistics re-estimated on the whole target; the method minimised the entropy of "
                "batch-statistics predictions (history.json, per step). Re-normalising changes confidence "
                "as well as accuracy; compare accuracies (eval_data) or estimated_accuracy_after instead.")
    return ("entropy_after > entropy_before: the adapted model is less confident on the target than the "
            "source model; lower entropy is not higher accuracy (a collapsed model is confident and wrong).")
