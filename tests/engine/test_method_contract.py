"""The contract every registered method keeps, checked on a tiny BatchNorm CNN: it updates only the
parameters it declares, is deterministic under a seed, honours cancellation between batches, reports
progress, and runs under bf16 autocast. Parametrised over the registry, so a new method is covered (and
declares what it updates in its catalogue entry, `updates`) as soon as its file exists."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from app.contract.catalog import get_method_info
from worker.adaptation.device import seed_everything
from worker.adaptation.errors import JobCancelled
from worker.adaptation.methods import _load_all  # noqa: F401  (registers every method)
from worker.adaptation.methods._tta import last_stage_prefixes
from worker.adaptation.methods.base import MethodContext
from worker.adaptation.methods.norm import BATCH_NORMS, norm_affine_params
from worker.adaptation.methods.registry import METHODS
from worker.adaptation.models import classifier_of
from worker.adaptation.runner import RunRequest, run

from .conftest import CNN_KWARGS, PRE

# Every per-batch method that adapts classifiers (the segmentation-only ones keep theirs in
# test_segmentation.py; multi-model jobs theirs in test_multisource*).
ALL_METHODS = sorted(n for n in METHODS if "classification" in get_method_info(n).tasks
                     and get_method_info(n).kind in ("baseline", "tta", "sfda"))
BATCH = 16

# Whether BatchNorm running statistics may change (methods that normalise with batch statistics keep
# them tracking the target; `source` must leave the model bit-identical).
BUFFERS_MAY_CHANGE = {"source": False}


def make_ctx(name: str, x: torch.Tensor, seed: int = 0, precision: str = "fp32", epochs: int = 2) -> MethodContext:
    n = len(x)

    def iterate():
        for i in range(0, n, BATCH):
            yield x[i:i + BATCH], torch.arange(i, min(i + BATCH, n))

    sfda = get_method_info(name).kind == "sfda"
    return MethodContext(num_classes=10, device=torch.device("cpu"), batch_size=BATCH,
                         epochs=epochs if sfda else 1, dataset_size=n, seed=seed, precision=precision,
                         iterate_target=iterate, input_mean=(0.5,), input_std=(0.5,))


def drive(name: str, model: torch.nn.Module, x: torch.Tensor, seed: int = 0, precision: str = "fp32",
          params: dict | None = None):
    """Run a method through its hooks, as the runner does (without files): returns (method, outputs)."""
    seed_everything(seed)
    info = get_method_info(name)
    ctx = make_ctx(name, x, seed, precision)
    method = METHODS[name](model, info.params_model.model_validate(params or {}), ctx)
    outs = []
    for epoch in range(ctx.epochs):
        method.begin_epoch(epoch)
        for xb, idx in ctx.iterate_target():
            outs.append(method.adapt(xb, idx))
    return method, outs


@pytest.fixture(scope="module")
def x64(digits):
    return digits.x_target[:64]


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_updates_only_what_it_declares(name, cnn, x64):
    model = copy.deepcopy(cnn)
    params_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers_before = {k: v.detach().clone() for k, v in model.named_buffers()}
    method, outs = drive(name, model, x64)
    assert all(torch.isfinite(o.logits).all() for o in outs)
    changed = _changed(params_before, dict(method.model.named_parameters()))
    buffers_changed = _changed(buffers_before, dict(method.model.named_buffers()))

    norm_affine = {k for k, _ in norm_affine_params(method.model)}
    scope = get_method_info(name).updates  # declared in the method's catalogue entry
    if scope == "nothing":
        assert not changed
    elif scope == "norm_affine":
        assert changed and changed <= norm_affine, changed - norm_affine
    elif scope == "norm_affine_but_last":
        skipped = {k for k, _ in norm_affine_params(method.model)} - \
            {k for k, _ in norm_affine_params(method.model, tuple(last_stage_prefixes(method.model)))}
        assert skipped, "the test model must have a last stage with norm layers"
        assert changed and changed <= norm_affine - skipped, changed - (norm_affine - skipped)
    elif scope == "all":
        assert changed - norm_affine, "an all-weights method must update more than the norm layers"
    elif scope == "all_but_classifier":
        head = classifier_of(method.model)
        head_names = {k for k, p in method.model.named_parameters() if any(p is q for q in head.parameters())}
        assert changed and not (changed & head_names), changed & head_names
    else:  # pragma: no cover
        pytest.fail(f"unknown scope {scope}")

    bn_buffers = {f"{m_name}.{b}" for m_name, m in method.model.named_modules() if isinstance(m, BATCH_NORMS)
                  for b, _ in m.named_buffers(recurse=False)}
    assert buffers_changed <= bn_buffers  # nothing but BatchNorm statistics
    if not BUFFERS_MAY_CHANGE.get(name, True):
        assert not buffers_changed


@pytest.mark.parametrize("name", ALL_METHODS)
def test_deterministic_under_a_seed(name, cnn, x64):
    states = []
    for _ in range(2):
        method, outs = drive(name, copy.deepcopy(cnn), x64, seed=3)
        states.append(({k: v.clone() for k, v in method.export_model().state_dict().items()},
                       {k: v.clone() for k, v in method.model.state_dict().items()},
                       torch.cat([o.logits for o in outs])))
    (e1, s1, l1), (e2, s2, l2) = states
    assert e1.keys() == e2.keys() and all(torch.equal(e1[k], e2[k]) for k in e1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(l1, l2)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_runs_under_bf16_autocast(name, cnn, digits):
    method, outs = drive(name, copy.deepcopy(cnn), digits.x_target[:32], precision="bf16")
    for o in outs:
        assert o.logits.dtype == torch.float32 and torch.isfinite(o.logits).all()
        assert o.loss is None or (o.loss.dtype == torch.float32 and torch.isfinite(o.loss))


class RecordingHooks:
    def __init__(self):
        self.calls: list[tuple[int, int, str]] = []

    def progress(self, done: int, total: int, phase: str) -> None:
        self.calls.append((done, total, phase))

    def should_cancel(self) -> bool:
        return False


def _request(name: str, run_files, tmp_path, epochs: int = 1) -> RunRequest:
    return RunRequest.for_files(run_files / "model.safetensors", run_files / "target.npz", tmp_path / name,
                                method=name, model={"architecture": "digit_cnn", "arch_kwargs": CNN_KWARGS,
                                                    "num_classes": 10},
                                preprocess=vars(PRE), options={"batch_size": BATCH, "epochs": epochs,
                                                               "device": "cpu", "precision": "fp32"})


@pytest.mark.parametrize("name", ALL_METHODS)
def test_cancel_between_batches(name, run_files, tmp_path, monkeypatch):
    """A cancellation requested after the second adaptation step stops the job before a third one."""
    cls = METHODS[name]
    steps = {"n": 0}
    original = cls.step

    def counting_step(self, x, index):
        steps["n"] += 1
        return original(self, x, index)

    monkeypatch.setattr(cls, "step", counting_step)
    hooks = RecordingHooks()
    hooks.should_cancel = lambda: steps["n"] >= 2
    with pytest.raises(JobCancelled):
        run(_request(name, run_files, tmp_path, epochs=2), hooks)
    assert steps["n"] == 2
    assert not (tmp_path / name / "model.safetensors").exists()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_reports_progress(name, run_files, tmp_path):
    hooks = RecordingHooks()
    epochs = 2 if get_method_info(name).kind == "sfda" else 1
    result = run(_request(name, run_files, tmp_path, epochs=epochs), hooks)
    n_images = 96
    total = math.ceil(n_images / BATCH) * epochs
    adapting = [(d, t) for d, t, phase in hooks.calls if phase == "adapting"]
    assert adapting[0] == (0, total)
    assert all(t == total for _, t in adapting)
    done = [d for d, _ in adapting]
    assert done == sorted(done) and done[-1] == total
    phases = [phase for _, _, phase in hooks.calls]
    assert phases.index("adapting") < phases.index("evaluating") < phases.index("exporting")
    assert result.metrics["timing"]["steps"] == total
    assert isinstance(result.metrics["method_report"], dict)
