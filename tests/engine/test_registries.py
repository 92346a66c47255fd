"""One name, one entry: the torch-free catalogue and manifest (app/contract) against the engine's
registries. A catalogue entry without an implementation would pass API validation and then fail in the
worker; an architecture the manifest does not declare could not be validated at submit."""
from __future__ import annotations

import pytest
import torch

from app.contract.architectures import ARCHITECTURES as MANIFEST
from app.contract.catalog import CATALOG
from app.contract.tasks import TASKS
from worker.adaptation.methods import _load_all  # noqa: F401  (registers every method)
from worker.adaptation.methods.registry import METHODS
from worker.adaptation.models import build_model
from worker.adaptation.models.registry import ARCHITECTURES, _ensure_builtins_loaded
from worker.adaptation.tasks import TASK_IMPLEMENTATIONS


def test_every_catalogue_entry_is_implemented_and_nothing_else():
    assert set(CATALOG) == set(METHODS)
    for name, cls in METHODS.items():
        assert cls.info is CATALOG[name] and cls.name == name


def test_the_manifest_lists_exactly_the_torch_architectures():
    _ensure_builtins_loaded()
    assert set(MANIFEST) == set(ARCHITECTURES)


def test_every_task_has_an_engine_module_and_every_declared_task_exists():
    assert set(TASK_IMPLEMENTATIONS) == set(TASKS)
    assert {t for info in CATALOG.values() for t in info.tasks} <= set(TASKS)
    assert {a.task for a in MANIFEST.values()} <= set(TASKS)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_architecture_runs_on_its_default_input_and_gives_its_output_form(name):
    info = MANIFEST[name]
    # Detectors resize inside (min_size/max_size): 64 px keeps torchvision's 800 px defaults CPU-cheap.
    model = build_model(name, 7, **({"min_size": 64, "max_size": 64} if info.task == "detection"
                                    and not name.startswith("ssd") else {})).eval()
    # Segmenters run at any size: 64 px keeps the 520 px torchvision defaults CPU-cheap here.
    size = info.input.size if info.task == "classification" else min(info.input.size or 64, 64)
    x = torch.randn(2, info.input.channels, size, size)
    assert len(info.input.mean) == len(info.input.std) == info.input.channels
    with torch.no_grad():
        out = model(x.clamp(0, 1) if info.task == "detection" else x)
    if info.output == "detections":
        assert len(out) == 2 and all({"boxes", "scores", "labels"} <= set(o) for o in out)
        assert all(o["boxes"].shape[1:] == (4,) and (o["labels"] < 7).all() for o in out)
        return
    expected = {"logits": (2, 7), "mask_logits": (2, 7, size, size), "mask_logits_dict": (2, 7, size, size)}
    assert tuple(out.shape) == expected[info.output]
