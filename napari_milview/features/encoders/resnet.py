"""ResNet-50 truncated after ``layer3`` + adaptive average pool: CLAM's 1024-d encoder.

Written in plain torch with torchvision's state-dict key names (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2,3}`` / ``bn{1,2,3}`` / ``downsample.{0,1}``), so a
torchvision-format ``resnet50`` state dict (torchvision's ``resnet50-19c8e357.pth`` /
``resnet50-0676ba61.pth``, timm's ``resnet50.tv_in1k``, TRIDENT's local file) loads
without torchvision or timm. The stride sits in the 3x3 conv (ResNet v1.5, as in
torchvision). Keys of ``layer4.*`` and ``fc.*`` are ignored by design; any other missing
or unexpected key is an error. BatchNorm ``num_batches_tracked`` may be absent (files
from before torch 0.4.1).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import RESNET50_TRUNC, EncoderError
from ._common import EncoderModule, load_strict, read_weights

__all__ = ["SPEC", "Bottleneck", "ResNet50Trunc", "load"]

SPEC = RESNET50_TRUNC

#: keys of a full torchvision ResNet-50 that the truncated network does not use
IGNORED_PREFIXES = ("layer4.", "fc.")


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (expansion 4, stride in ``conv2``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride,
                                                      bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        """[B, inplanes, H, W] -> [B, 4 planes, H / stride, W / stride]."""
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50Trunc(nn.Module):
    """ResNet-50 stem + ``layer1``-``layer3`` + ``AdaptiveAvgPool2d(1)``.

    ``forward(x [B, 3, H, W]) -> [B, 1024]`` (14 x 14 x 1024 before pooling at 224).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2))):
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] normalised -> [B, 1024]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def load(weights: str | os.PathLike | None) -> EncoderModule:
    """Build :class:`ResNet50Trunc` and load a torchvision-format ResNet-50 state dict.

    Parameters
    ----------
    weights : str or os.PathLike
        Local ``.pth`` / ``.bin`` / ``.safetensors`` file. ``layer4.*`` and ``fc.*`` keys
        are dropped; everything else must match exactly.

    Returns
    -------
    EncoderModule
        ``forward(x [B, 3, 224, 224]) -> [B, 1024]``, eval mode, ``spec`` = :data:`SPEC`.

    Raises
    ------
    EncoderError
        No weights given (nothing is downloaded), unreadable file, or a key mismatch
        (the missing / unexpected keys are named).
    """
    if weights is None:
        raise EncoderError(
            "resnet50_trunc needs local weights: pass weights=<torchvision resnet50 state "
            "dict, e.g. resnet50-19c8e357.pth or a .safetensors copy>; nothing is downloaded")
    sd = read_weights(weights, SPEC.name)
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    net = ResNet50Trunc()
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    load_strict(net, sd, SPEC.name, weights)
    return EncoderModule(net, SPEC).eval()
