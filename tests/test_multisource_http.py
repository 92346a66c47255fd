"""Several models per job through the HTTP API (embedded service, real worker): DistillWeighted from
three sources into an exported student, `auto` over three candidate methods, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.checks.metadata import decode, encode
from app.client import Client, ApiError
from tests.engine.test_multisource import KW, N_LABELLED, Pool
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors

PRE = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
STUDENT = {"architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": {"width": 8, "bottleneck": 32}}


@pytest.fixture(scope="module")
def c(embedded_service):
    with Client(embedded_service.url) as client:
        yield client


@pytest.fixture(scope="module")
def up(c, tmp_path_factory):
    """Three sources trained on three digit domains, a target none was trained on, 100 labelled images."""
    torch.set_num_threads(1)
    pool = Pool()
    d = tmp_path_factory.mktemp("multisource-http")
    raw = ((pool.x[:, 0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(d / "target.npz", x=raw)
    np.savez(d / "eval.npz", x=raw, y=pool.y.numpy())
    np.savez(d / "labelled.npz", x=raw[:N_LABELLED], y=pool.y.numpy()[:N_LABELLED])
    sources = []
    for name, model in zip(pool.names, pool.models):
        save_safetensors(model, d / f"{name}.safetensors")
        sources.append(c.upload(d / f"{name}.safetensors", "model")["id"])
    return {"sources": sources, "accuracy": pool.accuracy, "x": raw, "y": pool.y.numpy(), "dir": d,
            **{k: c.upload(d / f"{k}.npz", "dataset")["id"] for k in ("target", "eval", "labelled")}}


def source_ref(upload_id: str, **over) -> dict:
    return {"upload_id": upload_id, "architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": KW, **over}


def multisource_spec(up: dict, method: str = "distill_weighted", **over) -> dict:
    spec = {"method": method, "models": [source_ref(u) for u in up["sources"]], "student": dict(STUDENT),
            "data": {"upload_id": up["target"]}, "eval_data": {"upload_id": up["eval"]},
            "labelled_data": {"upload_id": up["labelled"]}, "preprocess": PRE,
            "options": {"batch_size": 64, "epochs": 4, "seed": 0}}
    spec.update(over)
    return spec


def test_three_source_distill_weighted(c, up, tmp_path):
    job = c.wait(c.submit(multisource_spec(up))["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert [s["index"] for s in m["sources"]] == [0, 1, 2]
    assert sum(s["weight"] for s in m["sources"]) == pytest.approx(1.0)
    similarities = [s["similarity"] for s in m["sources"]]
    assert m["selected_source"] == int(np.argmax(similarities)) == int(np.argmax(up["accuracy"]))
    assert [s["accuracy"] for s in m["sources"]] == pytest.approx(up["accuracy"], abs=1e-6)
    assert max(s["weight"] for s in m["sources"]) == m["sources"][m["selected_source"]]["weight"]
    assert m["accuracy_before"] == pytest.approx(max(up["accuracy"]), abs=1e-6)
    # The exported student reloads into its architecture and scores what the service reported.
    path = c.download(job["id"], "model.safetensors", tmp_path / "student.safetensors")
    student = build_model("digit_cnn", 10, **STUDENT["arch_kwargs"])
    student.load_state_dict(load_file(str(path)))
    x = (torch.from_numpy(up["x"]).float()[:, None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        acc = float((student.eval()(x).argmax(1).numpy() == up["y"]).mean())
    assert acc == pytest.approx(m["accuracy_after"], abs=1e-6)
    # ... and carries the adaptd metadata a resubmission needs (architecture, classes, kwargs, input)
    with safe_open(str(path), "pt") as f:
        meta = decode(f.metadata())
    assert {k: meta[k] for k in ("architecture", "num_classes", "arch_kwargs")} == STUDENT
    assert meta["preprocess"] == job["spec"]["preprocess"] and meta["method"] == "distill_weighted"


def test_distill_nearest_without_labels(c, up):
    spec = multisource_spec(up, "distill_nearest")
    del spec["labelled_data"]
    job = c.wait(c.submit(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["pseudo_labels"] == "source_predictions"
    assert [s["weight"] for s in m["sources"]] == [1.0 if i == m["selected_source"] else 0.0 for i in range(3)]
    assert m["selected_source"] == int(np.argmax(up["accuracy"]))


def test_auto_three_candidates(c, up):
    best = up["sources"][int(np.argmax(up["accuracy"]))]
    spec = {"method": "auto", "params": {"candidates": ["source", "bn_adapt", "tent"]},
            "model": source_ref(best), "data": {"upload_id": up["target"]}, "eval_data": {"upload_id": up["eval"]},
            "preprocess": PRE, "options": {"batch_size": 64, "seed": 0}}
    job = c.wait(c.submit(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert [x["method"] for x in m["candidates"]] == ["source", "bn_adapt", "tent"]
    assert all(0 <= x["score"] <= 1 and 0 <= x["accuracy_after"] <= 1 for x in m["candidates"])
    assert m["criterion"] == "bounded_confidence"
    picked = max(m["candidates"], key=lambda x: x["score"])
    assert m["selected_method"] == picked["method"] and m["accuracy_after"] == picked["accuracy_after"]


@pytest.mark.parametrize("case, field", [
    ("class_count_mismatch", "models[1].num_classes"),
    ("too_many_sources", "models"),
    ("unknown_student_architecture", "student.architecture"),
    ("models_with_single_model_method", "models"),
    ("model_with_multisource_method", "model"),
    ("auto_unknown_candidate", "params.candidates"),
])
def test_refusals(c, up, case, field):
    spec = multisource_spec(up)
    if case == "class_count_mismatch":
        del spec["labelled_data"]
        spec["models"][1]["num_classes"] = 5
    elif case == "too_many_sources":
        spec["models"] = [source_ref(up["sources"][0])] * 9
    elif case == "unknown_student_architecture":
        spec["student"]["architecture"] = "no_such_net"
    elif case == "models_with_single_model_method":
        spec["method"] = "tent"
    elif case == "model_with_multisource_method":
        spec = {"method": "distill_nearest", "model": source_ref(up["sources"][0]), "data": {"upload_id": up["target"]}}
    elif case == "auto_unknown_candidate":
        spec = {"method": "auto", "params": {"candidates": ["tent", "distill_nearest"]},
                "model": source_ref(up["sources"][0]), "data": {"upload_id": up["target"]}}
    with pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422, err.value
    assert field in f"{err.value} {err.value.detail}", (err.value, err.value.detail)


def test_sources_of_other_architectures_and_classes(c, up, tmp_path):
    """With labelled target images, a source may be another architecture with other classes (here an
    untrained 5-class ResNet-18): it is ranked and distilled by its features only, and has no accuracy."""
    torch.manual_seed(0)
    other = build_model("resnet18", 5, in_channels=1)
    save_safetensors(other, tmp_path / "resnet.safetensors")
    other_id = c.upload(tmp_path / "resnet.safetensors", "model")["id"]
    spec = multisource_spec(up, options={"batch_size": 64, "epochs": 1, "seed": 0})
    spec["models"].insert(1, {"upload_id": other_id, "architecture": "resnet18", "num_classes": 5,
                              "arch_kwargs": {"in_channels": 1}})
    job = c.wait(c.submit(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert [s["index"] for s in m["sources"]] == [0, 1, 2, 3]
    assert m["sources"][1]["accuracy"] is None and all(m["sources"][i]["accuracy"] is not None for i in (0, 2, 3))
    assert all(np.isfinite(s["similarity"]) for s in m["sources"])
    assert sum(s["weight"] for s in m["sources"]) == pytest.approx(1.0)
    assert m["selected_source"] != 1  # the untrained network is not the nearest
    assert m["pseudo_labels"] == "labelled_centroids"


def test_sources_complete_from_their_metadata(c, up, tmp_path):
    """Sources adaptd exported (their adaptd metadata) need no architecture, classes or kwargs in the spec;
    the completed spec is checked again (class counts), and a source with neither is refused by name."""
    ids = []
    for i, name in enumerate(("clean", "scanner", "inverted")):
        meta = encode(architecture="digit_cnn", num_classes=5 if name == "inverted" else 10, arch_kwargs=KW,
                      preprocess=PRE, task="classification", method="source")
        save_file(load_file(str(up["dir"] / f"{name}.safetensors")), str(tmp_path / f"{name}.safetensors"), meta)
        ids.append(c.upload(tmp_path / f"{name}.safetensors", "model")["id"])
    spec = multisource_spec(up, "distill_nearest", models=[{"upload_id": i} for i in ids[:2]],
                            options={"batch_size": 64, "epochs": 1, "seed": 0})
    del spec["labelled_data"]
    job = c.submit(spec)
    assert [{k: m[k] for k in ("architecture", "num_classes", "arch_kwargs")} for m in job["spec"]["models"]] == [
        {"architecture": "digit_cnn", "num_classes": 10, "arch_kwargs": KW}] * 2
    job = c.wait(job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert [s["accuracy"] for s in job["metrics"]["sources"]] == pytest.approx(up["accuracy"][:2], abs=1e-6)
    # the metadata's 5 classes against the student's 10, without labelled images: refused at submit
    spec["models"] = [{"upload_id": i} for i in ids]
    with pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422 and "models[2].num_classes is 5" in err.value.message, err.value
    # a checkpoint without metadata, and no architecture in the spec
    spec["models"] = [{"upload_id": ids[0]}, {"upload_id": up["sources"][1]}]
    with pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422 and err.value.detail["field"] == "models[1].architecture", err.value
