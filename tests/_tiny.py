"""Tiny models for the CLI tests, at module level so that ``torch.load`` can unpickle them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["INPUT_SIZE", "STRIDE", "Branchy", "TinyNet"]

INPUT_SIZE = (12, 12)
STRIDE = (2, 2)


class TinyNet(nn.Module):
    """A padding-free digits-style classifier: 1x12x12 -> 8x4x4 features -> flatten head.

    Without padding or global context every cell of its dense map equals the classifier
    on that cell's 12x12 crop (stride 2).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU()
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Branchy(TinyNet):
    """TinyNet with data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return super().forward(x)
