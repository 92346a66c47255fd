"""Behaviour of the test-time methods (tent, eata, sar, cotta, rmt, roid), the batched augmentation and
the runner's collapse guard, on tiny models and tens of images."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from app.contract.catalog import CATALOG, get_method_info
from worker.adaptation.device import seed_everything
from worker.adaptation.errors import AdaptationError
from worker.adaptation.methods import _load_all  # noqa: F401
from worker.adaptation.methods.augment import COTTA_AUGMENT, ROID_AUGMENT, AugmentSpec, BatchAugment
from worker.adaptation.methods.base import MethodContext, softmax_entropy
from worker.adaptation.methods.norm import norm_affine_params, use_batch_statistics
from worker.adaptation.methods.registry import METHODS
from worker.adaptation.methods.roid import prior_corrected
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.runner import RunRequest, run

from .conftest import PRE, VIT_KWARGS

# From the catalogue entries (what a method updates is declared there), never a hand list.
CLASSIFIERS = {n: i for n, i in CATALOG.items() if "classification" in i.tasks}  # these tests' models
TTA = sorted(n for n, i in CLASSIFIERS.items() if i.kind == "tta" and i.updates_weights)
NORM_METHODS = sorted(n for n, i in CLASSIFIERS.items() if i.updates in ("norm_affine", "norm_affine_but_last"))


def make(name: str, model, params: dict | None = None, batch_size: int = 16, seed: int = 0):
    seed_everything(seed)
    ctx = MethodContext(num_classes=10, device=torch.device("cpu"), batch_size=batch_size, epochs=1,
                        dataset_size=128, seed=seed, input_mean=(0.5,), input_std=(0.5,))
    return METHODS[name](copy.deepcopy(model), get_method_info(name).params_model.model_validate(params or {}), ctx)


def batches(x: torch.Tensor, size: int = 16, passes: int = 1):
    for _ in range(passes):
        for i in range(0, len(x), size):
            yield x[i:i + size], torch.arange(i, min(i + size, len(x)))


def norm_state(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in norm_affine_params(model)}


@torch.no_grad()
def batch_stat_entropy(model, x: torch.Tensor) -> float:
    use_batch_statistics(model)
    return float(torch.cat([softmax_entropy(model(xb)) for xb, _ in batches(x)]).mean())


# --- tent -----------------------------------------------------------------------------------------

def test_tent_entropy_falls_on_shifted_data(cnn, digits):
    # Adam at 1e-2: 24 small steps on 128 images (the authors' 1e-3 is for thousands of CIFAR batches)
    method = make("tent", cnn, {"lr": 1e-2})
    before = batch_stat_entropy(copy.deepcopy(cnn), digits.x_target)
    for xb, idx in batches(digits.x_target, passes=3):
        method.adapt(xb, idx)
    after = batch_stat_entropy(method.model, digits.x_target)
    assert after < 0.8 * before, (before, after)


# --- eata -----------------------------------------------------------------------------------------

def test_eata_uses_only_reliable_non_redundant_samples(cnn, digits):
    method = make("eata", cnn)
    used = reliable = 0.0
    for xb, idx in batches(digits.x_target):
        logs = method.adapt(xb, idx).logs
        assert logs["used"] <= logs["reliable"] <= len(xb)
        used, reliable = used + float(logs["used"]), reliable + float(logs["reliable"])
    n = len(digits.x_target)
    assert 0 < used < reliable < n  # both filters removed samples
    report = method.report()
    assert report["samples_used_for_updates"] == used and report["images_seen"] == n


def test_eata_redundancy_filter_is_the_d_margin(cnn, digits):
    method = make("eata", cnn, {"d_margin": 1.0})  # |cos| < 1: nothing is redundant
    for xb, idx in batches(digits.x_target):
        logs = method.adapt(xb, idx).logs
        assert logs["used"] == logs["reliable"]


def test_eata_without_reliable_samples_leaves_weights_alone(cnn, digits):
    method = make("eata", cnn, {"e_margin": 1e-6})
    before = norm_state(method.model)
    for xb, idx in batches(digits.x_target[:48]):
        out = method.adapt(xb, idx)
        assert out.logs["used"] == 0 and out.loss == 0
    after = norm_state(method.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # on CPU the empty update is skipped outright (as the reference does): no backward, no optimizer step
    assert not method.optimizer.state and all(q.grad is None for q in method.norm_params)


# --- sar ------------------------------------------------------------------------------------------

def test_sar_resets_to_source_after_an_induced_collapse(cnn, digits):
    # lr 10 on every norm layer drives the entropy of the reliable samples to ~0: the EMA of the loss
    # falls under 0.2 within a few batches and SAR's model recovery must fire.
    method = make("sar", cnn, {"lr": 10.0, "skip_modules": []})
    source = norm_state(method.model)
    resets = 0
    for xb, idx in batches(digits.x_target, passes=3):
        out = method.adapt(xb, idx)
        if out.logs["reset"] == 1:
            resets += 1
            now = norm_state(method.model)
            assert all(torch.equal(source[k], now[k]) for k in source)  # back to the source weights
            assert not bool(method.loss_ema_valid)
    assert resets >= 1
    assert method.report()["resets"] == resets


def test_sar_skips_the_last_stage(cnn, vit, gn_net, digits):
    for model, skipped in [(cnn, ["bottleneck"]), (vit, ["norm", "blocks.1"]), (gn_net, ["head"])]:
        method = make("sar", model, {"e_margin": 1.0, "lr": 0.05})
        assert method.skipped == skipped
        before = {k: p.detach().clone() for k, p in method.model.named_parameters()}
        for xb, idx in batches(digits.x_target[:48]):
            method.adapt(xb, idx)
        changed = {k for k, p in method.model.named_parameters() if not torch.equal(before[k], p)}
        assert changed and changed == set(method.adapted_names)
        assert not any(k == s or k.startswith(s + ".") for k in changed for s in skipped)


# --- cotta / rmt -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cotta", "rmt"])
def test_teacher_is_an_ema_of_the_student(name, cnn, digits):
    params = {"teacher_momentum": 0.9}
    if name == "cotta":
        params["restore_prob"] = 0.0
    method = make(name, cnn, params)
    teacher0 = [p.detach().clone() for p in method.teacher.parameters()]
    xb, idx = next(batches(digits.x_target))
    method.adapt(xb, idx)
    for t0, t1, s1 in zip(teacher0, method.teacher.parameters(), method.model.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1)
    assert method.export_model() is method.teacher


@pytest.mark.parametrize("name", ["cotta", "rmt"])
def test_teacher_differs_from_student(name, cnn, digits):
    method = make(name, cnn)
    for xb, idx in batches(digits.x_target[:64]):
        method.adapt(xb, idx)
    diffs = [float((t - s).abs().max()) for t, s in zip(method.teacher.parameters(), method.model.parameters())
             for t, s in [(t.detach(), s.detach())]]
    assert max(diffs) > 0
    # the teacher moved from the source, a little (0.999)
    source = METHODS[name](copy.deepcopy(cnn), get_method_info(name).params_model(), method.ctx).teacher
    moved = [float((t - s).abs().max()) for t, s in zip(method.teacher.parameters(), source.parameters())]
    assert 0 < max(moved) < max(diffs)


def test_cotta_stochastic_restore_and_augmentation_switch(cnn, digits):
    xb, idx = next(batches(digits.x_target))
    method = make("cotta", cnn, {"restore_prob": 1.0, "ap": 1.0, "n_augmentations": 4})
    source = [p.detach().clone() for p in method.model.parameters()]
    out = method.adapt(xb, idx)
    assert out.logs["augmented"] == 1  # anchor confidence < 1: augmentation-averaged teacher
    assert all(torch.equal(s, p) for s, p in zip(source, method.model.parameters()))  # all restored
    method = make("cotta", cnn, {"ap": 0.0})
    with torch.no_grad():
        expected = method.teacher(xb)
    out = method.adapt(xb, idx)
    assert out.logs["augmented"] == 0
    torch.testing.assert_close(out.logits, expected)  # the prediction is the teacher's, before the update


def test_rmt_prototypes_are_frozen_after_the_first_batches(cnn, digits):
    method = make("rmt", cnn, {"prototype_batches": 2})
    it = batches(digits.x_target)
    for _ in range(2):
        method.adapt(*next(it))
    frozen = (method.proto_sum.clone(), method.proto_weight.clone())
    assert frozen[1].sum() > 0
    for xb, idx in it:
        method.adapt(xb, idx)
    assert torch.equal(frozen[0], method.proto_sum) and torch.equal(frozen[1], method.proto_weight)
    assert method.report()["classes_with_prototype"] == int((frozen[1] > 0).sum())


# --- roid -----------------------------------------------------------------------------------------

def test_roid_weight_ensembling_pulls_towards_source(cnn, digits):
    # with lr 0 the optimizer step is a no-op, so one step is exactly θ ← m·θ + (1 − m)·θ_src
    method = make("roid", cnn, {"lr": 1e-12})
    source = norm_state(method.model)
    with torch.no_grad():
        for q in method.norm_params:
            q.add_(1.0)
    before = norm_state(method.model)
    method.adapt(*next(batches(digits.x_target)))
    after = norm_state(method.model)
    for k in source:
        torch.testing.assert_close(after[k], 0.99 * before[k] + 0.01 * source[k])


def test_roid_weight_ensembling_keeps_weights_near_source(cnn, digits):
    def drift(momentum_src: float) -> float:
        method = make("roid", cnn, {"lr": 0.05, "momentum_src": momentum_src})
        source = norm_state(method.model)
        for xb, idx in batches(digits.x_target, passes=4):
            method.adapt(xb, idx)
        now = norm_state(method.model)
        return math.sqrt(sum(float(((now[k] - source[k]) ** 2).sum()) for k in source))

    # 32 steps: with m = 0.9 the pull balances the updates after ~10 steps; without it they accumulate.
    # (The default 0.99 balances after ~100 steps: the continual runs it is made for.)
    with_ensembling, without = drift(0.9), drift(1.0)
    assert 0 < with_ensembling < 0.5 * without, (with_ensembling, without)


def test_roid_prior_correction():
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 3
    out = prior_corrected(logits)
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / 8, 1 / 5) / prior.max()
    smoothed = (prior + smooth) / (1 + smooth * 5)
    expected = logits.softmax(1) * smoothed
    torch.testing.assert_close(out.softmax(1), expected / expected.sum(1, keepdim=True))


# --- state, norms, batch sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TTA)
def test_snapshot_restore_replays_a_step_exactly(name, cnn, digits):
    """snapshot/restore carry every piece of state (teacher, EMAs, prototypes, optimizer): replaying a
    batch from a snapshot gives the same output and the same weights."""
    method = make(name, cnn)
    it = batches(digits.x_target)
    method.adapt(*next(it))
    xb, idx = next(it)
    state = method.snapshot()
    results = []
    for _ in range(2):
        method.restore(state)
        seed_everything(7)
        out = method.adapt(xb, idx)
        results.append((out.logits.clone(), out.loss.clone(),
                        {k: v.clone() for k, v in method.export_model().state_dict().items()}))
    (l1, s1, w1), (l2, s2, w2) = results
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("name", NORM_METHODS)
@pytest.mark.parametrize("model_name", ["vit", "gn_net"])
@pytest.mark.parametrize("batch_size", [16, 1])
def test_norm_methods_run_without_batchnorm(name, model_name, batch_size, request, digits):
    model = request.getfixturevalue(model_name)
    params = {"e_margin": 1.0} if name in ("eata", "sar") else {}  # undertrained models: every sample counts
    method = make(name, model, params, batch_size=batch_size)
    before = norm_state(method.model)
    for xb, idx in batches(digits.x_target[:32], size=batch_size):
        out = method.adapt(xb, idx)
        assert out.logits.shape == (len(xb), 10) and torch.isfinite(out.logits).all()
    after = norm_state(method.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", TTA)
def test_batchnorm_at_batch_size_one_is_refused(name, cnn):
    with pytest.raises(AdaptationError) as exc:
        make(name, cnn, batch_size=1)
    assert exc.value.code == "batch_size_too_small"


@pytest.mark.parametrize("name", sorted(n for n, i in CLASSIFIERS.items() if i.kind == "tta"))
def test_a_last_batch_of_one_image_is_predicted_not_adapted(name, cnn, digits):
    method = make(name, cnn)
    method.adapt(digits.x_target[:16], torch.arange(16))
    out = method.adapt(digits.x_target[16:17], torch.arange(16, 17))  # BatchNorm1d refuses one sample
    assert out.logits.shape == (1, 10) and out.loss is None


# --- the runner's collapse guard ----------------------------------------------------------------------

def test_collapse_guard_rolls_back_a_collapsing_tent(vit, digits, tmp_path):
    # TENT with SGD lr 1 on a LayerNorm ViT collapses to one class within ~20 batches.
    save_safetensors(vit, tmp_path / "vit.safetensors")
    np.savez(tmp_path / "t.npz", x=np.concatenate([digits.x_target_raw] * 3),
             y=np.concatenate([digits.y_target.numpy()] * 3))

    def go(guard: bool):
        return run(RunRequest.for_files(
            tmp_path / "vit.safetensors", tmp_path / "t.npz", tmp_path / f"out{guard}", method="tent",
            model={"architecture": "vit_small_digits", "arch_kwargs": VIT_KWARGS, "num_classes": 10},
            preprocess=vars(PRE), options={"batch_size": 16, "device": "cpu"},
            params={"optimizer": "sgd", "lr": 1.0, "collapse_guard": guard})).metrics

    unguarded = go(False)
    threshold = min(0.25 * math.log(10), 0.5 * unguarded["target"]["before"]["predicted_class_entropy"])
    assert unguarded["predicted_class_entropy_after"] < threshold  # it does collapse without the guard
    assert not unguarded["collapse_detected"]

    guarded = go(True)
    assert guarded["collapse_detected"] is True
    reasons = [e["reason"] for e in guarded["collapse"]["events"]]
    assert "predicted_class_histogram_collapsed" in reasons
    assert guarded["predicted_class_entropy_after"] > threshold  # the exported model is not one-class
    assert sum(c > 0 for c in guarded["target"]["after"]["predicted_class_histogram"]) >= 3


# --- batched augmentation -----------------------------------------------------------------------------

IDENTITY = AugmentSpec(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), gamma=(1, 1),
                       degrees=0, translate=0, scale=(1, 1), blur_sigma=None, hflip=0, noise_std=0)


def test_augment_identity_and_flip_are_exact():
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 12, 12) - 0.5) / 0.25
    torch.testing.assert_close(BatchAugment(IDENTITY, (0.5,), (0.25,))(x), x, atol=1e-5, rtol=0)
    flip = AugmentSpec(**{**IDENTITY.__dict__, "hflip": 1.0})
    torch.testing.assert_close(BatchAugment(flip, (0.5,), (0.25,))(x), x.flip(-1), atol=1e-5, rtol=0)


def test_augment_hue_rotation_keeps_luma_and_a_full_turn_is_identity():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    aug = BatchAugment()
    torch.testing.assert_close(aug._rotate_hue(x, torch.ones(4)), x, atol=1e-5, rtol=0)
    half = aug._rotate_hue(x, torch.full((4,), 0.5))
    assert (half - x).abs().max() > 0.05
    torch.testing.assert_close(aug._gray(half), aug._gray(x), atol=1e-5, rtol=0)  # Y is untouched


@pytest.mark.parametrize("spec", [COTTA_AUGMENT, ROID_AUGMENT])
def test_augment_draws_per_image_parameters(spec):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).repeat(6, 1, 1, 1)  # six identical images
    for aug in (BatchAugment(spec, (0.5,), (0.5,)), BatchAugment(spec)):
        out = aug((x - 0.5) / 0.5)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert all(not torch.equal(out[0], out[i]) for i in range(1, 6))
        views = aug.views(x, 4)
        assert views.shape == (24, 3, 16, 16)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert BatchAugment(spec, (0.5,), (0.5,))(cl).is_contiguous(memory_format=torch.channels_last)


def test_augment_stays_in_pixel_range():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    out = BatchAugment(COTTA_AUGMENT, (0.0,), (1.0,))(x)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01
