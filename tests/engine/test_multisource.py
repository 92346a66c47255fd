"""Multi-source engine on tiny real digits (scikit-learn's): the task similarity ranks source models like
their true target accuracy, the weights follow it, DistillNearest/DistillWeighted students beat the best
source, and the label-free estimators hold their defining properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.demo_data import load_sklearn_digits, shift_domain, upscale
from app.contract.catalog.multimodel import DistillWeightedParams
from worker.adaptation import distill as D
from worker.adaptation import estimation as E
from worker.adaptation import transferability as T
from worker.adaptation.data import Preprocess
from worker.adaptation.device import seed_everything
from worker.adaptation.models import build_model
from worker.adaptation.training import train_classifier

PRE = Preprocess(size=16, channels=1, mean=[0.5], std=[0.5])
KW = dict(width=8, bottleneck=32)
N_LABELLED = 100
CPU = torch.device("cpu")


def config(epochs: int) -> D.DistillConfig:
    return D.DistillConfig.from_params(DistillWeightedParams().model_dump(), epochs=epochs, seed=0)


class Pool:
    """Three sources, each trained on its own digit domain (clean, a 'scanner' shift, inverted ink), and a
    target domain none was trained on (another scanner)."""

    def __init__(self):
        x, y = load_sklearn_digits()
        x = upscale(x, 2)
        order = np.random.default_rng(0).permutation(len(x))
        parts = {"clean": order[:500], "scanner": order[500:1000], "inverted": order[1000:1500]}
        domains = {"clean": x[parts["clean"]], "scanner": shift_domain(x[parts["scanner"]], seed=1),
                   "inverted": 255 - x[parts["inverted"]]}
        self.names = list(domains)
        self.models = []
        for name in self.names:
            seed_everything(0)
            self.models.append(train_classifier(build_model("digit_cnn", 10, **KW), domains[name], y[parts[name]],
                                                PRE, epochs=6, lr=5e-3, augment_shift=1))
        t = order[1500:]
        self.x = PRE(torch.from_numpy(shift_domain(x[t], seed=5, scale=0.8, contrast=0.8))[..., None], CPU)
        self.y = torch.from_numpy(y[t])
        self.outputs = [D.source_outputs(m, self.batches(), same_label_space=True) for m in self.models]
        self.accuracy = [float((o.probs.argmax(1) == self.y).float().mean()) for o in self.outputs]

    def batches(self, order=None, batch_size: int = 64):
        order = np.arange(len(self.x)) if order is None else order
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(np.asarray(order[start:start + batch_size]))
            yield self.x[idx], idx

    @property
    def labelled(self):
        return self.x[:N_LABELLED], self.y[:N_LABELLED]

    def similarities(self, labelled: bool) -> list[float]:
        lab = slice(0, N_LABELLED)
        return [T.source_similarity(o.features, o.probs, 10, (o.features[lab], self.y[lab]) if labelled else None)
                for o in self.outputs]

    def student_accuracy(self, weights: torch.Tensor, cfg: D.DistillConfig, sources=None) -> float:
        seed_everything(0)
        student = build_model("digit_cnn", 10, **KW)
        D.train_student(student, self.batches, sources or self.outputs, weights, self.labelled, cfg, CPU, len(self.x))
        with torch.no_grad():
            return float((student.eval()(self.x).argmax(1) == self.y).float().mean())


@pytest.fixture(scope="module")
def pool() -> Pool:
    torch.set_num_threads(1)
    return Pool()


@pytest.mark.parametrize("labelled", [False, True], ids=["own-predictions", "labelled-centroids"])
def test_similarity_picks_the_source_a_labelled_oracle_picks(pool, labelled):
    """The most similar source is the most accurate one on the target. (The other two are near chance,
    16 % and 21 %, and the similarity orders them the other way round.)"""
    assert max(pool.accuracy) > sorted(pool.accuracy)[1] + 0.2, pool.accuracy
    scores = pool.similarities(labelled)
    assert int(np.argmax(scores)) == int(np.argmax(pool.accuracy)), (scores, pool.accuracy)
    assert max(scores) > sorted(scores)[1] + 0.5


def test_collapsed_source_overlaps_fully(pool):
    feats = pool.outputs[0].features
    assert T.gbc(feats, torch.zeros(len(feats), dtype=torch.long), 10) == -1.0
    assert T.similarity(-1.0) == 0.0
    true = T.gbc(feats, pool.y, 10)
    assert -1.0 < true < 0.0


def test_weights_follow_similarity(pool):
    scores = pool.similarities(labelled=True)
    w = T.similarity_weights(scores)
    assert float(w.sum()) == pytest.approx(1.0)
    assert np.argsort(w.tolist()).tolist() == np.argsort(scores).tolist()
    assert T.similarity_weights(scores, temperature=1e-3).tolist() == D.nearest_weights(scores).tolist()


def test_distilled_students_beat_the_best_source(pool):
    scores = pool.similarities(labelled=True)
    cfg = config(40)
    nearest = pool.student_accuracy(D.nearest_weights(scores), cfg)
    weighted = pool.student_accuracy(T.similarity_weights(scores), cfg)
    labels_only = pool.student_accuracy(torch.zeros(3), cfg)
    best = max(pool.accuracy)
    assert nearest > best + 0.05 and weighted > best + 0.05, (nearest, weighted, pool.accuracy)
    # Distilling every source beats the same student trained on the 100 labelled images alone (here
    # DistillNearest does not: 71 % against 77 %). The margin depends on the CPU's float order: 2.7
    # points (8 of 297 images) on an Intel Xeon VM, more on an AMD EPYC one.
    assert weighted > labels_only + 0.02, (weighted, labels_only)


def test_feature_distillation_needs_no_shared_label_space(pool):
    """Sources with other label spaces (no logits): the student still learns from their features and
    the few labels, and the feature loss falls."""
    sources = [D.SourceOutputs(o.features, None) for o in pool.outputs]
    seed_everything(0)
    student = build_model("digit_cnn", 10, **KW)
    rows = D.train_student(student, pool.batches, sources, T.similarity_weights(pool.similarities(True)),
                           pool.labelled, config(6), CPU, len(pool.x))
    assert all(r["kd_loss"] == 0.0 for r in rows)
    first, last = np.mean([r["feature_loss"] for r in rows[:5]]), np.mean([r["feature_loss"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)


def test_pseudo_label_distillation_across_label_spaces(pool):
    """Sources over 5 classes of their own (pairs of digits merged), not the target's 10: no logit loss,
    but a head per source learns its soft pseudo-labels and that loss falls; off by default."""
    def merged(o: D.SourceOutputs) -> D.SourceOutputs:
        z = o.logits.view(len(o.logits), 5, 2).logsumexp(2)
        return D.SourceOutputs(o.features, z, same_label_space=False)

    sources = [merged(o) for o in pool.outputs]
    assert all(s.probs is None for s in sources)
    params = {**DistillWeightedParams().model_dump(), "pseudo_label_weight": 1.0}
    assert DistillWeightedParams().pseudo_label_weight == 0.0
    cfg = D.DistillConfig.from_params(params, epochs=6, seed=0)
    seed_everything(0)
    rows = D.train_student(build_model("digit_cnn", 10, **KW), pool.batches, sources,
                           T.similarity_weights(pool.similarities(True)), pool.labelled, cfg, CPU, len(pool.x))
    assert all(r["kd_loss"] == 0.0 for r in rows)
    first = np.mean([r["pseudo_label_loss"] for r in rows[:5]])
    last = np.mean([r["pseudo_label_loss"] for r in rows[-5:]])
    assert first > 0 and last < 0.7 * first, (first, last)
    default = D.train_student(build_model("digit_cnn", 10, **KW), pool.batches, sources, torch.ones(3) / 3,
                              pool.labelled, config(1), CPU, len(pool.x))
    assert all(r["pseudo_label_loss"] == 0.0 for r in default)


def test_atc_threshold_reproduces_the_labelled_accuracy(pool):
    probs, y = pool.outputs[1].probs, pool.y
    t = E.atc_threshold(probs, y)
    assert E.atc(probs, t) == pytest.approx(float((probs.argmax(1) == y).float().mean()), abs=1.5 / len(y))


def test_agreement_and_snd(pool):
    probs = [o.probs for o in pool.outputs]
    assert E.ensemble_agreement(probs[0], [probs[0]] * 3) == 1.0
    agreement = E.selection_scores(probs, "agreement")
    assert all(0.0 <= a <= 1.0 for a in agreement)
    # One-hot predictions, 10 classes of 30: each image's soft neighbours are (almost exactly) the 29
    # others of its class, so SND is ln 29.
    one_hot = torch.nn.functional.one_hot(torch.arange(300) % 10, 10).float()
    assert E.soft_neighborhood_density(one_hot) == pytest.approx(np.log(29), abs=1e-3)
    with pytest.raises(ValueError):
        E.selection_scores(probs, "oracle")


def test_rank_sources_modes(pool):
    lab = slice(0, N_LABELLED)
    labelled = [D.SourceOutputs(o.features[lab], o.logits[lab]) for o in pool.outputs]
    nearest = D.rank_sources(pool.outputs, labelled, pool.y[lab], 10, "nearest")
    weighted = D.rank_sources(pool.outputs, labelled, pool.y[lab], 10, "weighted")
    assert nearest["scores"] == weighted["scores"] == pool.similarities(labelled=True)
    assert nearest["weights"].tolist() == D.nearest_weights(nearest["scores"]).tolist()
    assert nearest["selected"] == weighted["selected"] == int(np.argmax(pool.accuracy))
    assert weighted["pseudo_labels"] == "labelled_centroids"
    own = D.rank_sources(pool.outputs, None, None, 10, "weighted")
    assert own["pseudo_labels"] == "source_predictions" and own["scores"] == pool.similarities(labelled=False)
    other_classes = [D.SourceOutputs(o.features, None) for o in pool.outputs]
    with pytest.raises(ValueError, match="labelled target set"):
        D.rank_sources(other_classes, None, None, 10, "weighted")


def test_choose_picks_the_highest_score(pool):
    probs = [o.probs for o in pool.outputs]
    out = E.choose(["a", "b", "c"], probs, "agreement")
    scores = [c["score"] for c in out["candidates"]]
    assert out["selected_method"] == "abc"[int(np.argmax(scores))] and out["criterion"] == "agreement"
    tie = E.choose(["x", "y"], [probs[0], probs[0]], "confidence")
    assert tie["selected_method"] == "x"


def test_class_balance_bound():
    collapsed = torch.nn.functional.one_hot(torch.full((50,), 8), 10).float()
    assert E.class_balance_bound(collapsed) == pytest.approx(0.1)
    assert E.bounded_confidence(collapsed) == pytest.approx(0.1)  # confidence 1.0, capped
    balanced = torch.nn.functional.one_hot(torch.arange(50) % 10, 10).float() * 0.5 + 0.05
    assert E.class_balance_bound(balanced) == pytest.approx(1.0)
    assert E.bounded_confidence(balanced) == pytest.approx(0.55)
    prior = torch.tensor([0.5] + [0.5 / 9] * 9)
    assert E.class_balance_bound(torch.nn.functional.one_hot(torch.zeros(10, dtype=torch.long), 10).float(), prior) == pytest.approx(0.5)


def test_job_estimate_and_entropy_note(pool):
    probs = pool.outputs[1].probs
    est = E.accuracy_estimate(probs)
    assert est["estimator"] == E.ESTIMATOR and est["estimated_accuracy_error"] == E.ESTIMATOR_MEAN_ABS_ERROR
    assert est["estimated_accuracy_after"] == E.bounded_confidence(probs) <= E.average_confidence(probs)
    assert E.entropy_note(0.6, 0.5, 10) is None
    assert "BatchNorm" in E.entropy_note(0.6, 0.99, 10)
    assert "BatchNorm" not in E.entropy_note(0.6, 0.99, 0)
    assert E.entropy_note(None, 0.99, 10) is None
    assert "student" in E.entropy_note(0.6, 0.99, 10, distilled=True)
    assert E.entropy_note(0.6, 0.5, 10, distilled=True) is None
