"""The backbone registry: one entry per `model.arch` value, everything purireid needs of a backbone.

Adding a backbone is one `Backbone` entry in `BACKBONES`: purireid.model.network builds the
model from it (constructor, ImageNet weights, the trunk's modules, the last-stride surgery),
BatchNorm folding (`fold_batchnorm`, the CPU fast path of `purireid extract`) and the export
read its layer names, `purireid doctor` its feature dimension, and the config schema's
`model.arch` choices are this registry's keys (purireid.config.resolve.load_schema).

Plain data, no torch import: the config check, which runs when Snakemake parses the workflow,
reads the names without paying for torch (~2 s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHS", "BACKBONES", "Backbone", "resnet_conv_bn_pairs"]

RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet_conv_bn_pairs(model: Any) -> list[tuple[Any, str, str]]:
    """(parent module, convolution name, BatchNorm name) of every convolution followed by a
    BatchNorm in a torchvision ResNet trunk: the stem, each block's conv{i}/bn{i} and its
    downsample shortcut (Sequential 0/1)."""
    pairs = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    return pairs


@dataclass(frozen=True)
class Backbone:
    """A backbone: how to build it, where its ImageNet weights come from, what it outputs.

    constructor: the torchvision.models function (called with weights=None); weights: its
    torchvision ImageNet weights ("<Enum>.<member>"), preferred first (IMAGENET1K_V1 first: what
    `pretrained=True` gave the authors' code); feat_dim: channels of the final feature map, the
    feature dimension; trunk: the child modules that run in order from the image to that map
    (kept under these names on the model, so a torchvision state_dict loads key for key);
    stride_one: the convolutions set to stride 1 for the paper's last stride of 1 (module
    paths); conv_bn_pairs: the convolution + BatchNorm pairs that fold into one convolution.
    """

    constructor: str
    weights: tuple[str, ...]
    feat_dim: int
    trunk: tuple[str, ...] = RESNET_TRUNK
    stride_one: tuple[str, ...] = ("layer4.0.conv2", "layer4.0.downsample.0")  # Bottleneck blocks
    conv_bn_pairs: Callable[[Any], list[tuple[Any, str, str]]] = resnet_conv_bn_pairs


_BASIC_BLOCK_STRIDE = ("layer4.0.conv1", "layer4.0.downsample.0")  # BasicBlock: the stride is on conv1

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("resnet18", ("ResNet18_Weights.IMAGENET1K_V1",), 512, stride_one=_BASIC_BLOCK_STRIDE),
    "resnet34": Backbone("resnet34", ("ResNet34_Weights.IMAGENET1K_V1",), 512, stride_one=_BASIC_BLOCK_STRIDE),
    "resnet50": Backbone("resnet50", ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"), 2048),
}

ARCHS: tuple[str, ...] = tuple(BACKBONES)
