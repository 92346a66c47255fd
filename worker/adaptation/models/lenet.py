"""LeNet as the SHOT authors build it for MNIST/USPS (Liang et al., ICML 2020, digit experiments):
two 5×5 convolutions (20 and 50 channels, dropout before the second pooling), a bottleneck
(Linear 800→256, BatchNorm1d, dropout 0.5) and a weight-normalised linear classifier. 28 px inputs."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .registry import register_architecture


class LeNet(nn.Module):
    classifier_name = "classifier"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, bottleneck: int = 256, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(20, 50, 5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
        )
        # SHOT's "bn" bottleneck: no activation after the BatchNorm; dropout is on while SFDA methods train
        self.bottleneck = nn.Sequential(nn.Linear(50 * 4 * 4, bottleneck),
                                        nn.BatchNorm1d(bottleneck), nn.Dropout(dropout))
        self.classifier = weight_norm(nn.Linear(bottleneck, num_classes), name="weight")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_architecture("lenet")
def lenet(num_classes: int = 10, **kwargs) -> nn.Module:
    return LeNet(num_classes=num_classes, **kwargs)
