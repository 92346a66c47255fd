"""The multi-model runs end to end on files (the worker's side of a job): DistillWeighted from three
sources into a student, and `auto` over three candidate methods."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.adaptation.models.export import save_safetensors
from worker.adaptation.models.loading import load_model
from worker.adaptation.multisource_run import DistillRequest, execute, run_distill
from worker.adaptation.runner import RunRequest

from .test_multisource import KW, N_LABELLED, Pool

PRE = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
STUDENT_KW = {"width": 8, "bottleneck": 32}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    pool = Pool()
    d = tmp_path_factory.mktemp("ms")
    paths = []
    for name, model in zip(pool.names, pool.models):
        paths.append(d / f"{name}.safetensors")
        save_safetensors(model, paths[-1])
    raw = ((pool.x[:, 0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(d / "target.npz", x=raw, y=pool.y.numpy())
    np.savez(d / "labelled.npz", x=raw[:N_LABELLED], y=pool.y.numpy()[:N_LABELLED])
    return {"dir": d, "sources": paths, "accuracy": pool.accuracy}


def auto_request(files, out: Path, params: dict, model: Path | None = None) -> RunRequest:
    d = files["dir"]
    return RunRequest.for_files(model or files["sources"][0], d / "target.npz", out, eval_path=d / "target.npz",
                                method="auto", params=params,
                                model={"architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": KW},
                                preprocess=PRE, options={"batch_size": 64, "device": "cpu"})


def test_distill_weighted_run(files, tmp_path):
    d = files["dir"]
    req = DistillRequest.for_files(
        files["sources"], d / "target.npz", tmp_path, eval_path=d / "target.npz", labelled_path=d / "labelled.npz",
        method="distill_weighted", models=[{"architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": KW}] * 3,
        student={"architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": STUDENT_KW}, preprocess=PRE,
        options={"batch_size": 64, "epochs": 3, "device": "cpu"})
    result = run_distill(req)
    m = result.metrics
    assert [s["index"] for s in m["sources"]] == [0, 1, 2]
    assert sum(s["weight"] for s in m["sources"]) == pytest.approx(1.0)
    assert m["selected_source"] == int(np.argmax(files["accuracy"]))
    assert [s["accuracy"] for s in m["sources"]] == pytest.approx(files["accuracy"])
    assert m["accuracy_before"] == pytest.approx(max(files["accuracy"]))
    assert 0.0 <= m["accuracy_after"] <= 1.0 and m["pseudo_labels"] == "labelled_centroids"
    assert m["params"]["temperature"] == 1.0 and m["estimator"] == "bounded_confidence"
    student, _ = load_model("digit_cnn", 10, STUDENT_KW, result.model_path)
    assert student(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_auto_run(files, tmp_path):
    best = files["sources"][int(np.argmax(files["accuracy"]))]
    params = {"candidates": ["source", "bn_adapt", "tent"], "criterion": "agreement", "budget_s": None}
    result = execute(auto_request(files, tmp_path, params, best))
    m = result.metrics
    assert [c["method"] for c in m["candidates"]] == ["source", "bn_adapt", "tent"]
    assert all(0 <= c["score"] <= 1 and 0 <= c["accuracy_after"] <= 1 for c in m["candidates"])
    scores = [c["score"] for c in m["candidates"]]
    assert m["selected_method"] == m["candidates"][int(np.argmax(scores))]["method"]
    assert m["accuracy_after"] == next(c["accuracy_after"] for c in m["candidates"] if c["method"] == m["selected_method"])
    assert m["params"] == params and m["skipped_candidates"] == []
    assert result.model_path.read_bytes() == (tmp_path / "candidates" / m["selected_method"] / "model.safetensors").read_bytes()


def test_auto_budget_runs_the_first_candidate_only(files, tmp_path):
    params = {"candidates": ["source", "bn_adapt"], "criterion": "bounded_confidence", "budget_s": 1e-9}
    m = execute(auto_request(files, tmp_path, params)).metrics
    assert [c["method"] for c in m["candidates"]] == ["source"] and m["skipped_candidates"] == ["bn_adapt"]
    assert m["selected_method"] == "source"
