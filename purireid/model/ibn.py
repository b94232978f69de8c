"""ResNet-50-IBN-a (IBN-Net, Pan et al., ECCV 2018): instance and batch normalisation in one block.

Instance normalisation removes an image's own contrast and colour statistics, which carry the
camera's appearance rather than the person's; batch normalisation keeps what tells people
apart. IBN-Net-a puts both in the shallow layers, where appearance variance lives: in every
bottleneck of layer1 to layer3 the normalisation after the first 1x1 convolution
normalises the first half of its channels per image (InstanceNorm, with affine parameters)
and the other half over the batch (BatchNorm). The stem, every other normalisation and all
of layer4 are ResNet-50's, so the network has ResNet-50's shapes and parameter count.

The module names follow the published weights file (``layerX.Y.bn1.IN`` / ``layerX.Y.bn1.BN``),
so it loads key for key into the trunk.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.resnet import ResNet

__all__ = ["IBN", "IBN_LAYERS", "resnet50_ibn_a"]

#: The layers whose bottlenecks carry an IBN after conv1 (the "a" variant: not layer4).
IBN_LAYERS = ("layer1", "layer2", "layer3")


class IBN(nn.Module):
    """InstanceNorm on the first ``planes // 2`` channels, BatchNorm on the rest, concatenated."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(first), self.BN(rest)), dim=1)


def resnet50_ibn_a() -> ResNet:
    """ResNet-50-IBN-a with random weights: torchvision's ResNet-50 with the first
    normalisation of every bottleneck in layer1..layer3 an :class:`IBN`."""
    model = resnet50(weights=None)
    for name in IBN_LAYERS:
        for block in getattr(model, name):
            block.bn1 = IBN(block.bn1.num_features)
    return model
