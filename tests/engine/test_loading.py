"""Checkpoint loading: formats, wrappers, architecture compatibility, and loading that cannot be abused."""
from __future__ import annotations

import pickle
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.builders
from tests import builders as B  # noqa: E402
from worker.adaptation.errors import AdaptationError  # noqa: E402
from worker.adaptation.models import loading as L  # noqa: E402
from worker.adaptation.models.registry import (ALLOWLIST_ENV, build_model, classifier_of,  # noqa: E402
                                               is_allowed_module)

torch.set_num_threads(1)


def digit_state(num_classes: int = 10, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("digit_cnn", num_classes, **kw)
    with torch.no_grad():  # non-default BN statistics, so loading them is observable
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.state_dict()


def load(path, architecture="digit_cnn", num_classes=10, arch_kwargs=None, fmt=None):
    return L.load_model(architecture, num_classes, arch_kwargs or {}, Path(path), fmt)


def refused(code, fn, *args, **kw) -> AdaptationError:
    with pytest.raises(AdaptationError) as info:
        fn(*args, **kw)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


# --- formats ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_state_dict_formats(tmp_path, fmt):
    state = digit_state()
    path = B.save_checkpoint(state, tmp_path / f"m.{fmt}", fmt)
    assert L.detect_model_format(path) == fmt
    model, report = load(path)
    assert_same_state(model, state)
    assert report["tensors"] == len(state) and report["format"] == fmt and report["notes"] == []
    model2, _ = load(path, fmt=fmt)  # declared format
    assert_same_state(model2, state)


def test_legacy_torch_save_format(tmp_path):
    state = digit_state()
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert_same_state(load(path)[0], state)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapped_and_prefixed_checkpoints(tmp_path, wrap, prefix):
    state = digit_state()
    path = B.save_checkpoint(state, tmp_path / "m.pt", wrap=wrap, prefix=prefix,
                             extra={"epoch": 12, "best_acc": 0.91, "optimizer": {"lr": 0.1}})
    model, report = load(path)
    assert_same_state(model, state)
    if wrap:
        assert f"unwrapped '{wrap}'" in report["notes"]
    for p in filter(None, prefix.split(".")):
        assert f"stripped '{p}.' prefix" in report["notes"]


def test_prefixed_safetensors(tmp_path):
    state = digit_state()
    path = B.save_checkpoint(state, tmp_path / "m.safetensors", "safetensors", prefix="module.")
    assert_same_state(load(path)[0], state)


def test_other_common_prefix_is_stripped_when_it_makes_keys_match(tmp_path):
    state = digit_state()
    path = B.save_checkpoint(state, tmp_path / "m.pt", wrap="state_dict", prefix="model.")  # Lightning-style
    model, report = load(path)
    assert_same_state(model, state)
    assert "stripped 'model.' prefix" in report["notes"]


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    """Checkpoints saved before PyTorch 0.4 (torchvision's published ResNet weights) lack the buffer."""
    state = {k: v for k, v in digit_state().items() if not k.endswith("num_batches_tracked")}
    model, report = load(B.save_checkpoint(state, tmp_path / "m.pt"))
    assert any("num_batches_tracked" in n for n in report["notes"])
    for k, v in state.items():
        torch.testing.assert_close(model.state_dict()[k], v)


# --- architecture compatibility ---------------------------------------------------------------------

def meta_state(architecture: str, num_classes: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(architecture, num_classes)
    return model.state_dict(), sum(p.numel() for p in model.parameters())


# torchvision.models.resnet18/50(): 122 and 320 state-dict entries (with one num_batches_tracked per
# BatchNorm: 20 and 53), 11,689,512 and 25,557,032 parameters (torchvision's documented counts).
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.running_var", "layer3.1.bn2.bias", "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.bn2.running_mean", "fc.weight", "fc.bias",
]
TORCHVISION_RESNET50_KEYS = [
    "layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer1.0.downsample.0.weight",
    "layer3.5.conv2.weight", "layer4.2.bn3.running_var", "fc.weight",
]


@pytest.mark.parametrize("architecture,entries,bn,params,keys", [
    ("resnet18", 122, 20, 11_689_512, TORCHVISION_RESNET18_KEYS),
    ("resnet50", 320, 53, 25_557_032, TORCHVISION_RESNET50_KEYS),
])
def test_resnet_keys_match_torchvision(architecture, entries, bn, params, keys):
    state, n_params = meta_state(architecture, 1000)
    assert len(state) == entries
    assert sum(k.endswith("num_batches_tracked") for k in state) == bn
    assert n_params == params
    assert set(keys) <= set(state)
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"] and list(state)[-2:] == ["fc.weight", "fc.bias"]
    assert state["fc.weight"].shape == (1000, 2048 if architecture == "resnet50" else 512)
    assert any("layer1.0.downsample" in k for k in state) == (architecture == "resnet50")  # Bottleneck widens


def test_wrn28_10_keys_match_robustbench_standard():
    state, n_params = meta_state("wrn28_10", 10)
    assert len(state) == 155 and n_params == 36_479_194
    assert sorted(k for k in state if "convShortcut" in k) == [
        "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
        "block3.layer.0.convShortcut.weight"]
    for k in ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight",
              "block1.layer.3.bn2.running_var", "block3.layer.3.conv2.weight", "bn1.running_mean",
              "fc.weight", "fc.bias"]:
        assert k in state
    assert state["block1.layer.0.conv1.weight"].shape == (160, 16, 3, 3)
    assert state["fc.weight"].shape == (10, 640)


def test_torchvision_style_resnet18_checkpoint_loads(tmp_path):
    """A torchvision checkpoint as published: no num_batches_tracked, DataParallel prefix, wrapped."""
    torch.manual_seed(0)
    state = {k: v for k, v in build_model("resnet18", 10).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = B.save_checkpoint(state, tmp_path / "r18.pth", wrap="state_dict", prefix="module.")
    model, report = load(path, "resnet18", 10)
    torch.testing.assert_close(model.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert report["tensors"] == 122


# --- refusals: unsafe and malformed checkpoints -----------------------------------------------------

@pytest.mark.parametrize("container", ["torch", "pickle"])
@pytest.mark.parametrize("payload", ["open", "system"])
@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, container, payload,
                                                         force_no_weights_only):
    if force_no_weights_only:  # torch's escape hatch must not reach an explicit weights_only=True
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = B.malicious_checkpoint(tmp_path / "evil.pt", marker, container, payload)
    err = refused("unsafe_checkpoint", load, path)
    assert not marker.exists()
    assert err.detail["global"] == {"open": "io.open", "system": "posix.system"}[payload]
    assert "GLOBAL" in err.detail["reason"] and "weights_only" not in err.detail["reason"]
    err = refused("unsafe_checkpoint", load, path, fmt="pt")
    assert not marker.exists()
    refused("unsafe_checkpoint", L.read_state_dict, path)
    assert not marker.exists()


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_the_malicious_payloads_are_live(tmp_path, container):
    """Control: full unpickling of the same files does create the marker, so the test above means something."""
    marker = tmp_path / "pwned"
    path = B.malicious_checkpoint(tmp_path / "evil.pt", marker, container, "open")
    if container == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_protocol_0_pickle_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = B.malicious_checkpoint(tmp_path / "evil.pt", marker, "pickle0", "open")
    refused("unsupported_format", load, path)
    refused("unsupported_format", load, path, fmt="pt")
    assert not marker.exists()


def test_pickled_module_is_unsafe(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("digit_cnn", 10), path)
    err = refused("unsafe_checkpoint", load, path)
    assert "DigitCNN" in err.detail.get("global", "") + err.detail["reason"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    refused("unsupported_format", load, path)


def test_unknown_and_declared_formats(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    refused("unsupported_format", load, junk)
    refused("unsupported_format", load, junk, fmt="pt")
    good = B.save_checkpoint(digit_state(), tmp_path / "m.safetensors", "safetensors")
    refused("unsupported_format", load, good, fmt="onnx")
    err = refused("format_mismatch", load, good, fmt="pt")
    assert err.detail == {"declared": "pt", "detected": "safetensors"}


def test_corrupt_checkpoints(tmp_path):
    good = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    refused("invalid_checkpoint", load, cut)
    st = B.save_checkpoint(digit_state(), tmp_path / "m.safetensors", "safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st.read_bytes()[:-100])
    refused("invalid_checkpoint", load, bad)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"epoch": 3, "acc": 0.5}, path)
    err = refused("invalid_checkpoint", load, path)
    assert err.detail["non_tensor_keys"] == ["acc", "epoch"]
    torch.save([torch.zeros(1)], path)
    refused("invalid_checkpoint", load, path)


def test_nonfinite_weights(tmp_path):
    state = digit_state()
    state["classifier.weight"][0, 0] = float("nan")
    err = refused("nonfinite_weights", load, B.save_checkpoint(state, tmp_path / "m.pt"))
    assert err.detail["tensors"] == ["classifier.weight"]


def test_sparse_tensors_are_refused(tmp_path):
    state = digit_state()
    state["classifier.weight"] = state["classifier.weight"].to_sparse()
    refused("invalid_checkpoint", load, B.save_checkpoint(state, tmp_path / "m.pt"))


def test_integer_weights_are_a_dtype_mismatch(tmp_path):
    state = digit_state()
    state["classifier.weight"] = (state["classifier.weight"] * 100).to(torch.int8)
    refused("dtype_mismatch", load, B.save_checkpoint(state, tmp_path / "m.pt"))


def test_half_precision_weights_are_cast(tmp_path):
    state = {k: v.half() if v.is_floating_point() else v for k, v in digit_state().items()}
    model, _ = load(B.save_checkpoint(state, tmp_path / "m.safetensors", "safetensors"))
    assert model.classifier.weight.dtype == torch.float32


def test_shape_mismatch_lists_are_trimmed(tmp_path):
    state = digit_state(width=16)
    err = refused("shape_mismatch", load, B.save_checkpoint(state, tmp_path / "m.pt"))
    assert len(err.detail["shape_mismatch"]) == L.TRIM < err.detail["counts"]["shape_mismatch"]
    state = digit_state()
    state["extra.weight"] = torch.zeros(1)
    del state["features.0.weight"]
    err = refused("shape_mismatch", load, B.save_checkpoint(state, tmp_path / "m2.pt"))
    assert err.detail["missing"] == ["features.0.weight"] and err.detail["unexpected"] == ["extra.weight"]


def test_num_classes_mismatch(tmp_path):
    err = refused("num_classes_mismatch", load, B.save_checkpoint(digit_state(7), tmp_path / "m.pt"))
    assert err.detail == {"checkpoint_num_classes": 7, "num_classes": 10}


def test_arch_kwargs_cannot_allocate_a_huge_model(tmp_path):
    """The architecture is compared on the meta device first: a width of 10^6 (terabytes of weights)
    is refused as a mismatch without allocating anything."""
    path = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    refused("shape_mismatch", load, path, arch_kwargs={"width": 1_000_000})


def test_unknown_architecture_and_bad_kwargs(tmp_path):
    path = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    refused("unknown_architecture", load, path, "resnet1000")
    refused("invalid_arch_kwargs", load, path, arch_kwargs={"no_such_kwarg": 1})
    refused("invalid_arch_kwargs", load, path, arch_kwargs=["width"])
    refused("invalid_arch_kwargs", load, path, "wrn28_10", arch_kwargs={"drop_rate": 0.0, "depth": 3})


# --- user architectures (allow-listed import paths) -------------------------------------------------

@pytest.fixture
def user_arch(tmp_path, monkeypatch):
    """A fresh importable package per test; returns (module path, import marker)."""
    package = f"adaptd_testarch_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    module = B.write_user_arch_package(tmp_path / "site", package, import_marker=marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    yield module, marker
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def user_checkpoint(module: str, tmp_path: Path, factory: str = "small_net") -> Path:
    import importlib

    torch.manual_seed(0)
    state = getattr(importlib.import_module(module), factory)(num_classes=10).state_dict()
    return B.save_checkpoint(state, tmp_path / "user.safetensors", "safetensors")


def test_user_architecture_not_allow_listed_is_never_imported(tmp_path, user_arch):
    module, marker = user_arch
    path = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    err = refused("architecture_not_allowed", load, path, f"{module}:small_net")
    assert err.detail["module"] == module and err.detail["allowed_modules"] == []
    assert not marker.exists() and module not in sys.modules


def test_user_architecture_prefix_tricks(tmp_path, user_arch, monkeypatch):
    module, marker = user_arch
    package = module.split(".")[0]
    path = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    monkeypatch.setenv(ALLOWLIST_ENV, package[:-3])  # a string prefix of the package, not a parent
    refused("architecture_not_allowed", load, path, f"{module}:small_net")
    for bad in [f".{module}:small_net", f"{module}:small_net.__globals__", f"{module}:__import__",
                f"{module}/x:small_net", f"{module}:"]:
        monkeypatch.setenv(ALLOWLIST_ENV, package)
        refused("architecture_not_allowed", load, path, bad)
    assert not marker.exists()
    assert is_allowed_module("a.b.c", ["a.b"]) and is_allowed_module("a.b", ["a.b"])
    assert not is_allowed_module("a.bc", ["a.b"]) and not is_allowed_module("a", ["a.b"])


@pytest.mark.parametrize("listed", ["package", "module"])
def test_user_architecture_allow_listed_loads(tmp_path, user_arch, monkeypatch, listed):
    module, marker = user_arch
    monkeypatch.setenv(ALLOWLIST_ENV, f" other.pkg , {module.split('.')[0] if listed == 'package' else module}")
    path = user_checkpoint(module, tmp_path)
    model, report = load(path, f"{module}:small_net")
    assert marker.exists() and type(model).__name__ == "SmallNet"
    assert report["architecture"] == f"{module}:small_net"
    assert classifier_of(model) is model.head


def test_user_architecture_bad_factories(tmp_path, user_arch, monkeypatch):
    module, _ = user_arch
    monkeypatch.setenv(ALLOWLIST_ENV, module)
    path = user_checkpoint(module, tmp_path)
    refused("invalid_architecture", load, path, f"{module}:not_a_module")
    refused("invalid_architecture", load, path, f"{module}:NOT_CALLABLE")
    refused("unknown_architecture", load, path, f"{module}:missing")
    refused("invalid_arch_kwargs", load, path, f"{module}:small_net", arch_kwargs={"bogus": 1})
    monkeypatch.setenv(ALLOWLIST_ENV, "adaptd_no_such_pkg")
    refused("architecture_unavailable", load, path, "adaptd_no_such_pkg.models:small_net")


# --- timm (the dev extra installs it: a real model, random init, nothing downloaded) ---------------

@pytest.mark.parametrize("timm_name, norm", [("test_efficientnet", nn.BatchNorm2d), ("test_vit", nn.LayerNorm)])
def test_timm_models_load_for_real(tmp_path, monkeypatch, timm_name, norm):
    import timm  # the dev extra installs it
    calls: list = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append(kw) or real_create(*a, **kw))
    torch.manual_seed(0)
    state = real_create(timm_name, pretrained=False, num_classes=5).state_dict()
    path = B.save_checkpoint(state, tmp_path / "t.safetensors", "safetensors")
    model, _ = load(path, f"timm:{timm_name}", 5)
    assert calls[-1]["pretrained"] is False and calls[-1]["num_classes"] == 5
    assert_same_state(model, state)
    assert classifier_of(model) is model.get_classifier()  # timm's head, by timm's own convention
    assert any(isinstance(m, norm) for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, *model.pretrained_cfg["input_size"][1:])).shape == (2, 5)
    refused("num_classes_mismatch", load, path, f"timm:{timm_name}", 7)
    refused("unknown_architecture", load, path, "timm:no_such_net", 5)
    refused("unknown_architecture", load, path, "timm:", 5)
    for kwargs in [{"pretrained": True}, {"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": {}}]:
        refused("invalid_arch_kwargs", load, path, f"timm:{timm_name}", 5, arch_kwargs=kwargs)


def test_tent_adapts_a_timm_model():
    """A norm-based method finds timm's norm layers and takes a step that changes them."""
    import timm  # the dev extra installs it
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    method = make_method("tent", model, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k and k.endswith("weight")}
    method.step(torch.rand(8, 3, 64, 64), torch.arange(8))
    after = model.state_dict()
    assert before and any(not torch.equal(before[k], after[k]) for k in before)


def test_timm_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    path = B.save_checkpoint(digit_state(), tmp_path / "m.pt")
    err = refused("architecture_unavailable", load, path, "timm:resnet50")
    assert "timm" in err.message


# --- norm-based methods need norm layers ------------------------------------------------------------

def make_method(name: str, model: nn.Module, num_classes: int = 10):
    from app.contract.catalog import get_method_info
    from worker.adaptation.methods import get_method
    from worker.adaptation.methods.base import MethodContext

    params = get_method_info(name).params_model.model_validate({})
    ctx = MethodContext(num_classes=num_classes, device=torch.device("cpu"), batch_size=8, epochs=1, dataset_size=16)
    return get_method(name)(model, params, ctx)


def test_norm_methods_on_a_model_without_norm_layers(tmp_path, user_arch, monkeypatch):
    module, _ = user_arch
    monkeypatch.setenv(ALLOWLIST_ENV, module)
    model, _ = load(user_checkpoint(module, tmp_path, "no_norm_net"), f"{module}:no_norm_net")
    for method in ["tent", "bn_adapt"]:
        refused("no_norm_layers", make_method, method, model)


def test_bn_adapt_needs_batch_norm_not_just_layer_norm():
    refused("no_norm_layers", make_method, "bn_adapt", build_model("vit_small_digits", 10))
    make_method("tent", build_model("vit_small_digits", 10))  # LayerNorm affine params suffice for tent
