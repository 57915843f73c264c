"""Realistic victims beyond the paper's LeNet: BatchNorm + ReLU networks as the gradient-inversion
literature after DLG/iDLG attacks them (Geiping et al. 2020, "Inverting Gradients"; the breaching framework).

- `ResNet`: the CIFAR ResNet of He et al. 2016 (sec. 4.2), depth 6n+2 (20, 32, 56): a 3x3 conv of 16
  channels, three stages of n basic blocks at 16/32/64 channels, global average pool, one Linear layer.
- `ResNet18`: ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max pool), stages of [2, 2, 2, 2] basic
  blocks at 64/128/256/512 channels.
- `ConvNet`: breaching's "ConvNetBN", eight 3x3 conv-BN-ReLU layers with two 3x3 max pools.

Each is built layer for layer as breaching 0.1.2 builds the model of the same name for CIFAR
(`cases/models/model_preparation.py`, `resnets.py`): the same parameters and buffers, with the same shapes,
in the same state-dict order, under the same names less breaching's container prefix (`model.`;
`model.model.` for ConvNet). So one network's weights move into the other framework's by `copy_by_order`
(outputs then agree exactly, checked once against breaching in train and eval mode), and the two attack the
same victim side by side; tests/data/breaching_state_dicts.json holds breaching's state-dict shapes. `width` scales every channel count (1 is the published network); the factories take
`in_channels`, `image_size` and `num_classes` like `lightning_idlg.case.model.LeNet`, so the data set sizes them
(configs/model/resnet20.yaml, resnet18.yaml, convnet.yaml).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from lightning_idlg.errors import ConfigError


def _channels(base: int, width: float, key: str = "model.factory.width") -> int:
    """base x width channels (at least one), refusing a width that is not a positive number."""
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ConfigError(f"{key} must be a number > 0 (1: the published network), got {width!r}")
    return max(1, round(base * width))


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. Where the
    shape changes, the shortcut is a projection, 1x1 conv + BN (breaching's `downsample="B"`)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # registration order = state-dict order = breaching's BasicBlock (conv1, bn1, conv2, bn2, downsample)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # not in place: the block's input is also its shortcut
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class _CifarResNet(nn.Module):
    """stem (3x3 conv, stride 1, no bias - BN - ReLU), stages of basic blocks (the first at stride 1, each
    later one halving the resolution and doubling the channels), global average pool, Linear."""

    def __init__(self, in_channels: int, num_classes: int, blocks: Sequence[int], base: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False),
                                  nn.BatchNorm2d(base), nn.ReLU())
        stages, planes, in_planes = [], base, base
        for index, count in enumerate(blocks):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes, planes = planes, planes * 2
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        # He et al. 2015's init for convolutions (as torchvision and breaching); BatchNorm starts at 1 and 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.avgpool(self.layers(self.stem(x))).flatten(1))


class ResNet(_CifarResNet):
    """The CIFAR ResNet of He et al. 2016 (sec. 4.2): depth = 6n + 2 (20, 32, 56, 110; 8 for tests), three
    stages of n basic blocks at 16, 32, 64 channels (x `width`). 272,474 parameters at depth 20 on 3x32x32
    and 10 classes, as the paper's 0.27M.

    Two departures from the paper, both breaching's (`resnet20` in breaching 0.1.2), kept so that weights
    copy between the two: the shortcut that changes shape is a 1x1 conv + BN projection (the paper's
    option B) rather than the zero-padded identity (option A) the paper used on CIFAR; and the convolutions
    carry no bias (BatchNorm's shift makes it redundant)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, depth: int = 20, width: float = 1.0):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.factory.depth={depth!r} is not a CIFAR ResNet depth; valid: 6n+2 with n >= 1 "
                              "(8, 14, 20, 32, 44, 56, 110)")
        super().__init__(in_channels, num_classes, [(depth - 2) // 6] * 3, _channels(16, width))


class ResNet18(_CifarResNet):
    """ResNet-18 (He et al. 2016, table 1: [2, 2, 2, 2] basic blocks at 64, 128, 256, 512 channels, x `width`)
    with the CIFAR stem: a 3x3 conv at stride 1 and no max pool instead of the 7x7 stride-2 conv and max
    pool for ImageNet, so 32x32 inputs keep their resolution (breaching's `ResNet18` for CIFAR). Projection
    shortcuts (1x1 conv + BN) where the shape changes."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: float = 1.0):
        super().__init__(in_channels, num_classes, [2, 2, 2, 2], _channels(64, width))


class ConvNet(nn.Sequential):
    """breaching's `ConvNet` ("ConvNetBN", Geiping et al. 2020): eight 3x3 conv-BN-ReLU layers at width,
    2 width, 2 width, then 4 width, a 3x3 max pool after the sixth and after the eighth, one Linear layer
    (width 64 in breaching). The Linear layer reads 4 width x (image_size // 3 // 3)^2 features: 2,304
    x 100 classes at width 64 on CIFAR's 32x32 (breaching hard-codes the 3x3 map of 32x32 inputs)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 64):
        side = image_size // 3 // 3
        if side < 1:
            raise ConfigError(f"model=convnet needs images of at least 9x9 (two 3x3 max pools), got "
                              f"{image_size}x{image_size}; set dataset.image_size >= 9")
        w = _channels(1, width)
        widths = [(in_channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w),
                  (4 * w, 4 * w), (4 * w, 4 * w)]
        layers: list[tuple[str, nn.Module]] = []
        for i, (c_in, c_out) in enumerate(widths):
            layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1)), (f"bn{i}", nn.BatchNorm2d(c_out)),
                       (f"relu{i}", nn.ReLU())]
            if i in (5, 7):
                layers.append((f"pool{(i - 5) // 2}", nn.MaxPool2d(3)))
        layers += [("flatten", nn.Flatten()), ("linear", nn.Linear(4 * w * side * side, num_classes))]
        super().__init__(OrderedDict(layers))


def copy_by_order(src: nn.Module, dst: nn.Module) -> nn.Module:
    """`dst` with every parameter and buffer of `src` copied into it, paired by position in the two state
    dicts (names may differ between frameworks: breaching wraps its models in a `model.` container).
    Refuses, in one line, state dicts of different lengths or any pair of different shapes."""
    source, target = src.state_dict(), dst.state_dict()
    if len(source) != len(target):
        raise ValueError(f"cannot copy {type(src).__name__} into {type(dst).__name__} by order: {len(source)} "
                         f"state-dict entries against {len(target)}")
    for index, ((name, value), (dst_name, dst_value)) in enumerate(zip(source.items(), target.items())):
        if value.shape != dst_value.shape:
            raise ValueError(f"cannot copy {type(src).__name__} into {type(dst).__name__} by order: entry {index} "
                             f"{name} {tuple(value.shape)} against {dst_name} {tuple(dst_value.shape)}")
    dst.load_state_dict(OrderedDict(zip(target, source.values())))
    return dst
