"""The job contract's task rules, checked on the API's own validation (no database needed for these)."""
from __future__ import annotations

import pytest

from app.contract import architectures
from app.contract.catalog import CATALOG
from app.contract.jobs import JobSpec
from app.errors import ApiError, STATUS
from app.services.jobs import check_task

REF = {"upload_id": "u"}


def spec(**over) -> JobSpec:
    return JobSpec.model_validate({"method": "tent", "model": {**REF, "architecture": "digit_cnn",
                                                               "num_classes": 10}, "data": REF, **over})


def test_every_method_accepts_each_of_its_tasks_on_an_architecture_of_that_task():
    assert spec().task == "classification"
    by_task = {}
    for name, arch in architectures.ARCHITECTURES.items():
        by_task.setdefault(arch.task, name)
    for info in CATALOG.values():
        for task in info.tasks:
            check_task(spec(task=task, method=info.name,
                            model={**REF, "architecture": by_task[task], "num_classes": 10}), info)


def test_a_method_that_does_not_support_the_task_is_refused():
    method = next(i for i in CATALOG.values() if "classification" not in i.tasks)
    with pytest.raises(ApiError) as err:
        check_task(spec(method=method.name), method)  # a classification job
    assert err.value.code == "task_mismatch" and STATUS[err.value.code] == 422
    assert err.value.detail["field"] == "method"


def test_an_architecture_of_another_task_is_refused():
    method = next(i for i in CATALOG.values() if {"classification", "segmentation"} <= set(i.tasks))
    segmenter = next(n for n, a in architectures.ARCHITECTURES.items() if a.task == "segmentation")
    with pytest.raises(ApiError) as err:
        check_task(spec(method=method.name, model={**REF, "architecture": segmenter, "num_classes": 10}), method)
    assert err.value.code == "task_mismatch" and err.value.detail["field"] == "model.architecture"
    # names the manifest does not hold (timm, user factories) predict what the job says
    check_task(spec(method=method.name, model={**REF, "architecture": "timm:resnet18", "num_classes": 10}), method)


def test_the_worker_reads_the_stored_spec_with_the_same_jobspec(tmp_path):
    from worker.adaptation.errors import AdaptationError
    from worker.spec import build_run_request

    fetched = []

    def fetch(upload_id, dest):
        fetched.append(upload_id)
        return dest

    stored = spec(eval_data=REF).model_dump(mode="json")
    stored.pop("task")  # stored before the field existed: the contract's default applies
    req = build_run_request(stored, tmp_path, fetch)
    assert req.spec == spec(eval_data=REF) and req.spec.task == "classification"
    assert fetched == ["u"] and req.data_path == req.eval_path == req.model_path  # one upload, fetched once
    stored["model"]["num_classes"] = 0
    with pytest.raises(AdaptationError) as err:
        build_run_request(stored, tmp_path, fetch)
    assert err.value.code == "invalid_spec" and "model.num_classes" in err.value.message
