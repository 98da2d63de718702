"""The ResNet that tutorials teach, written as users write it (no class of torchvision's
or ours): ``ResidualBlock`` with ``conv1, bn1, relu, conv2, bn2`` and a
``shortcut = nn.Sequential(conv1x1, bn)`` when the stride or width changes, and
``out += self.shortcut(x)``. ``resnet_fused.convert`` fuses it through its graph pass; the
model benchmark (``--model tutorial_resnet18``) and ``examples/train_tutorial_digits.py``
use it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class TutorialResNet(nn.Module):
    """ResNet-18-like: a 3x3 (``small_input``) or 7x7/2 + max-pool stem, four stages of
    ``ResidualBlock``s, global average pooling and a linear classifier."""

    def __init__(
        self,
        blocks=(2, 2, 2, 2),
        widths=(64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                layers.append(ResidualBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def tutorial_resnet18(**kwargs) -> TutorialResNet:
    return TutorialResNet((2, 2, 2, 2), **kwargs)
