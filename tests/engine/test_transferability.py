"""The task similarity and DistillWeighted's weights on constructed cases whose answer is known in closed
form: GBC of Gaussians with given means and variances (Pandy et al.'s Bhattacharyya coefficient between
diagonal Gaussians), our normalisation over class pairs, the -ln(overlap) similarity and the softmax."""
from __future__ import annotations

import math

import pytest
import torch

from worker.adaptation import distill as D
from worker.adaptation import transferability as T


def two_point_class(mean: float, std: float, copies: int = 50) -> torch.Tensor:
    """Feature values {mean - std, mean + std}: population mean `mean`, variance std² exactly."""
    return torch.tensor([mean - std, mean + std] * copies, dtype=torch.float64)


def features(*classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat(classes)[:, None]  # one feature: PCA only centres it (and may flip its sign)
    y = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(classes)])
    return x, y


def test_gbc_of_two_gaussians_apart_is_the_mean_term():
    """Equal variances σ², means Δ apart: Bhattacharyya distance Δ²/(8σ²), here 16/8 = 2."""
    x, y = features(two_point_class(0.0, 1.0), two_point_class(4.0, 1.0))
    assert T.gbc(x, y, 2) == pytest.approx(-math.exp(-2.0), rel=1e-5)
    assert T.similarity(T.gbc(x, y, 2)) == pytest.approx(2.0, rel=1e-5)


def test_gbc_of_two_gaussians_with_one_mean_is_the_variance_term():
    """Same mean, variances 1 and 4: distance ½ ln(((1+4)/2) / √(1·4)) = ½ ln 1.25."""
    x, y = features(two_point_class(0.0, 1.0), two_point_class(0.0, 2.0))
    assert T.gbc(x, y, 2) == pytest.approx(-(1.25 ** -0.5), rel=1e-5)


def test_gbc_is_the_mean_over_class_pairs_and_a_missing_class_overlaps_fully():
    far = [two_point_class(0.0, 1.0), two_point_class(4.0, 1.0), two_point_class(1000.0, 1.0)]
    x, y = features(*far)
    assert T.gbc(x, y, 3) == pytest.approx(-math.exp(-2.0) / 3, rel=1e-5)  # pairs (0,1), (0,2), (1,2)
    # Class 2 predicted for one image only: no variance, so it overlaps classes 0 and 1 fully.
    x, y = features(far[0], far[1], torch.tensor([1000.0], dtype=torch.float64))
    assert T.gbc(x, y, 3) == pytest.approx(-(math.exp(-2.0) + 2.0) / 3, rel=1e-5)


def test_better_separated_source_is_more_similar():
    near = features(two_point_class(0.0, 1.0), two_point_class(2.0, 1.0))
    apart = features(two_point_class(0.0, 1.0), two_point_class(6.0, 1.0))
    assert T.similarity(T.gbc(*apart, 2)) > T.similarity(T.gbc(*near, 2))
    assert T.similarity(T.gbc(*near, 2)) == pytest.approx(0.5, rel=1e-4)   # 4/8
    assert T.similarity(T.gbc(*apart, 2)) == pytest.approx(4.5, rel=1e-4)  # 36/8


def test_weights_are_a_softmax_of_the_similarities():
    """Similarities 2, 2 - ln 2, 0: at temperature 1 the first source (half the class overlap of the
    second) gets twice its weight; at 1/2, four times; the weights sum to one."""
    scores = [2.0, 2.0 - math.log(2.0), 0.0]
    w = T.similarity_weights(scores)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(w[0] / w[1]) == pytest.approx(2.0, rel=1e-5)
    assert float(w[0] / w[2]) == pytest.approx(math.exp(2.0), rel=1e-5)
    sharp = T.similarity_weights(scores, temperature=0.5)
    assert float(sharp.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(sharp[0] / sharp[1]) == pytest.approx(4.0, rel=1e-5)
    assert float(sharp[0]) > float(w[0])
    assert D.nearest_weights(scores).tolist() == [1.0, 0.0, 0.0]
    assert D.nearest_weights([1.0, 1.0]).tolist() == [1.0, 0.0]  # ties: the first source
