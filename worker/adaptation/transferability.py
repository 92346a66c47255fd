"""Task similarity between a source model and the target data, from the source's features and pseudo-labels
on the target (no source data): the score DistillNearest ranks sources by and DistillWeighted weights them
with (Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314).

Provenance. Only the paper's abstract (and its ICLR 2023 submission's, OpenReview yzHn1QejdT4) could be
read from this environment: the stored copies of the full text (ar5iv, arXiv, a markdown mirror, the ICLR
text dump) are served from their first page only, and no code by the authors is in the code index (searched
2026-11-29: "DistillNearest", "DistillWeighted", the title, the arXiv id, the first author's
repositories). The abstract fixes: task-similarity metrics select the source (DistillNearest), sources are
weighted "by their relevance for the target task" (DistillWeighted), and the methods "merely need features
and pseudo-labels of the source models". Which metric the authors settled on, whether it is computed on
the few labelled images or on pseudo-labelled unlabelled ones, and how scores become weights are NOT
checked. GBC, the pseudo-labels below and a softmax of -ln(overlap) are this implementation's choices,
measured against the sources' true accuracy in BENCHMARKS.md ("Several source models").

The metric is the Gaussian Bhattacharyya Coefficient (GBC; Pandy et al., CVPR 2022): fit one diagonal
Gaussian per (pseudo-)class to the source's features of the target images and sum the pairwise
Bhattacharyya coefficients, i.e. how much the classes overlap in that source's feature space. Pure
functions over tensors; the runner supplies the features."""
from __future__ import annotations

import math

import torch

PCA_DIMS = 64           # Pandy et al. reduce features to 64 dimensions before fitting the Gaussians
MAX_IMAGES = 10_000     # the score is computed on at most this many target images (a fixed subsample)
MIN_PER_CLASS = 2       # a class needs two members for a variance; fewer counts as fully overlapping


def pca(features: torch.Tensor, dims: int = PCA_DIMS) -> torch.Tensor:
    """Centred features projected on their top `dims` principal directions (all of them when fewer)."""
    x = features.double() - features.double().mean(0, keepdim=True)
    k = min(dims, x.shape[0], x.shape[1])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def gbc(features: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 1e-6) -> float:
    """Mean pairwise Bhattacharyya coefficient between per-class diagonal Gaussians, negated: in [-1, 0),
    near 0 when the classes are well separated. Normalised by the number of class pairs (Pandy et al. sum
    them) so that scores over different class counts compare. A class with fewer than two members (a
    source that predicts it for no target image, e.g. a collapsed one) overlaps every other class fully."""
    x = pca(features)
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    present = counts >= MIN_PER_CLASS
    if num_classes < 2:
        return -1.0
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype)
    variances = torch.ones(num_classes, x.shape[1], dtype=x.dtype)
    for c in torch.nonzero(present).flatten().tolist():
        xc = x[labels == c]
        means[c], variances[c] = xc.mean(0), xc.var(0, unbiased=False) + eps
    log_var = variances.log().sum(1)
    total = 0.0
    for i in range(num_classes - 1):  # one row of class pairs at a time: memory O(C·d)
        j = slice(i + 1, num_classes)
        v = (variances[i] + variances[j]) / 2
        distance = 0.125 * ((means[i] - means[j]) ** 2 / v).sum(1) + 0.5 * (v.log().sum(1) - 0.5 * (log_var[i] + log_var[j]))
        bc = torch.exp(-distance)
        bc[~(present[i] & present[j])] = 1.0
        total += float(bc.sum())
    pairs = num_classes * (num_classes - 1) // 2
    return -max(total / pairs, 1e-300)


def centroid_labels(features: torch.Tensor, labelled_features: torch.Tensor, labelled_y: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """Pseudo-labels from a few labelled target images: nearest class centroid in the source's (L2
    normalised) feature space. Needs no shared label space between source and target."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    lf = torch.nn.functional.normalize(labelled_features.float(), dim=1)
    centroids = torch.zeros(num_classes, f.shape[1])
    centroids.index_add_(0, labelled_y, lf)
    counts = torch.bincount(labelled_y, minlength=num_classes).clamp_min(1).unsqueeze(1)
    centroids = torch.nn.functional.normalize(centroids / counts, dim=1)
    sim = f @ centroids.T
    sim[:, torch.bincount(labelled_y, minlength=num_classes) == 0] = -2.0  # classes without an example
    return sim.argmax(1)


def subsample(n: int, limit: int = MAX_IMAGES, seed: int = 0) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def similarity(gbc_score: float) -> float:
    """The similarity reported and weighted with: -ln(mean class overlap) = -ln(-GBC), the same ranking as
    GBC on a scale where differences are ratios of overlap (GBC itself crowds near 0 for good sources)."""
    return -math.log(-gbc_score)


def source_similarity(features: torch.Tensor, probs: torch.Tensor | None, num_classes: int,
                      labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """`similarity` of one source to the target task. Pseudo-labels: nearest labelled-target centroid when a labelled
    target set is given (`labelled` = (the source's features of it, labels)), else the source's own
    predictions (`probs`; then its label space must be the target's)."""
    if labelled is not None:
        labels = centroid_labels(features, labelled[0], labelled[1], num_classes)
    elif probs is not None:
        labels = probs.argmax(1)
    else:
        raise ValueError("pseudo-labels need either a labelled target set or the source's predictions")
    return similarity(gbc(features, labels, num_classes))


def similarity_weights(scores: list[float], temperature: float = 1.0) -> torch.Tensor:
    """DistillWeighted's per-source weights: a softmax of the similarities at `temperature` (weights sum to
    one; at 1 a source with e times less class overlap gets e times the weight; lower temperatures
    concentrate the weight on the nearest source, DistillNearest in the limit)."""
    s = torch.tensor(scores, dtype=torch.float64)
    return torch.softmax(s / temperature, 0).float()
