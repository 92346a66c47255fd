"""The job contract's task rules, checked on the API's own validation (no database needed for these)."""
from __future__ import annotations

import dataclasses

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


def test_task_defaults_to_classification_and_each_entry_passes_for_the_tasks_it_declares():
    assert spec().task == "classification"
    arch_of = {a.task: a.name for a in architectures.ARCHITECTURES.values()}  # one architecture per task
    for info in CATALOG.values():
        for task in info.tasks:
            check_task(spec(method=info.name, task=task,
                            model={**REF, "architecture": arch_of[task], "num_classes": 10}), info)
    for name, arch in architectures.ARCHITECTURES.items():  # `source` takes every task
        check_task(spec(method="source", model={**REF, "architecture": name, "num_classes": 10}, task=arch.task),
                   CATALOG["source"])


def test_a_method_that_does_not_support_the_task_is_refused():
    segmentation_only = dataclasses.replace(CATALOG["tent"], tasks=("segmentation",))
    with pytest.raises(ApiError) as err:
        check_task(spec(), segmentation_only)
    assert err.value.code == "task_mismatch" and STATUS[err.value.code] == 422
    assert err.value.detail["field"] == "method"


def test_an_architecture_of_another_task_is_refused(monkeypatch):
    detector = dataclasses.replace(architectures.ARCHITECTURES["digit_cnn"], name="det", task="detection")
    monkeypatch.setitem(architectures.ARCHITECTURES, "det", detector)
    with pytest.raises(ApiError) as err:
        check_task(spec(model={**REF, "architecture": "det", "num_classes": 10}), CATALOG["tent"])
    assert err.value.code == "task_mismatch" and err.value.detail["field"] == "model.architecture"
    # names the manifest does not hold (timm, user factories) predict what the job says
    check_task(spec(model={**REF, "architecture": "timm:resnet18", "num_classes": 10}), CATALOG["tent"])
