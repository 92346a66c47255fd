"""An allow-listed user architecture with a bug the engine cannot classify (a KeyError in forward): the path
of an `internal` error, for tests/security/test_error_details.py."""
from __future__ import annotations

from torch import nn


class Exploding(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        raise KeyError("a bug inside the model's own code")


def exploding(num_classes: int = 10) -> nn.Module:
    return Exploding(num_classes)
