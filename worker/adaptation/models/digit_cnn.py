"""A small BatchNorm CNN for digit-sized images (8-32 px): the embedded demo's and the tests' model."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_architecture


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitCNN(nn.Module):
    classifier_name = "classifier"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, bottleneck: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), *_conv_bn(width, width), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        # SHOT-style bottleneck: Linear + BN1d, then a plain linear classifier that SFDA methods freeze.
        self.bottleneck = nn.Sequential(nn.Linear(2 * width, bottleneck), nn.BatchNorm1d(bottleneck),
                                        nn.ReLU(inplace=True))
        self.classifier = nn.Linear(bottleneck, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_architecture("digit_cnn")
def digit_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    return DigitCNN(num_classes=num_classes, **kwargs)
