"""The networks a trial trains. Built from the `model` config group with hydra.utils.instantiate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
N_CLASSES = 10


class MLP(nn.Module):
    """The seed note's fully connected net: 784 -> hidden... -> 10, LeakyReLU between layers."""

    def __init__(
        self,
        hidden: Sequence[int] = (200, 200),
        negative_slope: float = 0.01,
        output_activation: bool = False,
    ):
        super().__init__()
        widths = [IMAGE_PIXELS, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(widths, widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.LeakyReLU(negative_slope, inplace=True)]
        layers.append(nn.Linear(widths[-1], N_CLASSES))
        if (
            output_activation
        ):  # the course code's LeakyReLU on the logits, for faithful reproduction
            layers.append(nn.LeakyReLU(negative_slope, inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """A small conv net: [conv5x5 -> ReLU -> maxpool2] x 2 -> linear -> ReLU -> linear."""

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
