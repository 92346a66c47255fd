"""The architecture manifest: every built-in architecture's task, output form and default input, torch-free
(the API validates specs against it; tests/engine/test_registries.py keeps it equal to the torch
registry and checks each entry's input/output on the built model). `timm:<name>` and allow-listed
`module.path:factory` names are resolved by the worker; the job's `task` says what they predict."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .tasks import Task

# The form of the model's output, per task: "logits" = (N, num_classes) class scores; "mask_logits" =
# (N, num_classes, H, W) per-pixel class scores at the input's size ("mask_logits_dict": torchvision's
# segmentation models, a dict whose "out" is that tensor and "aux" an optional auxiliary head); "detections" =
# torchvision's detector output in eval mode, one dict {"boxes" K×4 xyxy, "scores" K, "labels" K} per image
# (worker/adaptation/tasks/detection.py).
OutputForm = Literal["logits", "mask_logits", "mask_logits_dict", "detections"]


@dataclass(frozen=True)
class InputDefaults:
    """The input the architecture is built for by default (its arch_kwargs can change it)."""

    channels: int
    size: int | None  # None: the input size as it is (detectors resize inside, by min_size/max_size)
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    task: Task
    output: OutputForm
    input: InputDefaults
    description: str
    # Detectors: the label id that means "background" (torchvision's Faster R-CNN and SSD count it in
    # num_classes, at 0: object classes are 1..num_classes-1); None: every label id is an object class
    # (FCOS, RetinaNet; torchvision's COCO checkpoints still use 91 ids with id 0 unused).
    background_label: int | None = None


_DIGITS = InputDefaults(channels=1, size=32, mean=(0.5,), std=(0.5,))
_MNIST = InputDefaults(channels=1, size=28, mean=(0.5,), std=(0.5,))
_CIFAR = InputDefaults(channels=3, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
_IMAGENET = InputDefaults(channels=3, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_DIGITS_RGB = InputDefaults(channels=3, size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_CANVAS = InputDefaults(channels=3, size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# torchvision's segmentation references evaluate at 520 px (VOC/COCO) with ImageNet normalisation.
_TV_SEG = InputDefaults(channels=3, size=520, mean=_IMAGENET.mean, std=_IMAGENET.std)
# torchvision's detectors take [0, 1] pixels at any size: their own transform resizes (min_size, max_size)
# and normalises (image_mean, image_std), all arch_kwargs; boxes come back in the input's pixels.
_TV_DET = InputDefaults(channels=3, size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# (builder name, label 0 is background?) of torchvision's detectors served here.
TORCHVISION_DETECTORS = (("fasterrcnn_resnet50_fpn", True), ("fasterrcnn_resnet50_fpn_v2", True),
                         ("fasterrcnn_mobilenet_v3_large_fpn", True), ("fasterrcnn_mobilenet_v3_large_320_fpn", True),
                         ("fcos_resnet50_fpn", False), ("retinanet_resnet50_fpn", False),
                         ("retinanet_resnet50_fpn_v2", False), ("ssdlite320_mobilenet_v3_large", True))

ARCHITECTURES: dict[str, ArchitectureInfo] = {a.name: a for a in (
    ArchitectureInfo("digit_cnn", "classification", "logits", _DIGITS,
                     "Small CNN with a SHOT-style bottleneck (backbone -> bottleneck -> classifier)."),
    ArchitectureInfo("lenet", "classification", "logits", _MNIST,
                     "SHOT's digit LeNet (28 px): two 5x5 convolutions, a BatchNorm bottleneck, a weight-normalised "
                     "classifier."),
    ArchitectureInfo("resnet18", "classification", "logits", _IMAGENET, "torchvision ResNet-18 keys."),
    ArchitectureInfo("resnet34", "classification", "logits", _IMAGENET, "torchvision ResNet-34 keys."),
    ArchitectureInfo("resnet50", "classification", "logits", _IMAGENET, "torchvision ResNet-50 keys."),
    ArchitectureInfo("vit_small_digits", "classification", "logits", _DIGITS_RGB,
                     "Small ViT (patch 4, LayerNorm) for 32 px inputs."),
    ArchitectureInfo("wrn28_10", "classification", "logits", _CIFAR, "WideResNet-28-10, RobustBench keys."),
    ArchitectureInfo("unet_small", "segmentation", "mask_logits", _CANVAS,
                     "Small BatchNorm UNet (~0.12 M parameters, 2 poolings: H and W multiples of 4)."),
    *(ArchitectureInfo(name, "segmentation", "mask_logits_dict", _TV_SEG,
                       f"torchvision {name} (its keys; arch_kwargs reach the builder, e.g. aux_loss)")
      for name in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50",
                   "fcn_resnet50")),
    *(ArchitectureInfo(name, "detection", "detections", _TV_DET,
                       f"torchvision {name} (its keys, FrozenBatchNorm2d where its COCO checkpoints have it; "
                       "arch_kwargs reach the builder, e.g. min_size, max_size, image_mean, image_std)",
                       background_label=0 if background else None)
      for name, background in TORCHVISION_DETECTORS),
    ArchitectureInfo("fcos_small", "detection", "detections", _TV_DET,
                     "torchvision FCOS (its head, anchors, losses, NMS) on a small 3-stage CNN + torchvision "
                     "FeaturePyramidNetwork (~0.2 M parameters; strides 4 and 8): CPU-sized, for small canvases."),
)}
BUILTIN_ARCHITECTURES = tuple(ARCHITECTURES)


def is_resolvable_name(name: str) -> bool:
    return name in ARCHITECTURES or name.startswith("timm:") or (":" in name and not name.startswith(":"))


def task_of(name: str) -> Task | None:
    """The task a built-in architecture declares; None for timm and user factories (the job's `task`
    says what they predict)."""
    info = ARCHITECTURES.get(name)
    return info.task if info is not None else None
