"""Shared by the segmentation methods (cotta's segmentation step, idm): which parameters form a segmenter's
head, and its last classifier layer (whose input features are the pixels' embeddings).

Not a method: `_load_all` skips modules whose name starts with an underscore."""
from __future__ import annotations

from torch import nn

# Module names of a segmentation head: torchvision's segmenters (`classifier`, `aux_classifier`) and the
# built-in UNet (`head`); the reference library's DeepLab-v2 calls its ASPP classifier `seg_head`.
HEAD_NAMES = ("classifier", "aux_classifier", "head", "seg_head")


def classifier_layer(model: nn.Module, num_classes: int) -> nn.Conv2d:
    """The last Conv2d (in registration order) producing `num_classes` channels: the layer that turns pixel
    features into class logits."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels == num_classes:
            last = m
    if last is None:
        raise ValueError(f"the model has no Conv2d with {num_classes} output channels")
    return last


def head_parameters(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """The head's parameters: every parameter under a module named like a head (any level), else the
    classifier layer's."""
    found = [p for name, p in model.named_parameters() if any(part in HEAD_NAMES for part in name.split(".")[:-1])]
    return found or list(classifier_layer(model, num_classes).parameters())
