"""The backbone registry: one entry per `model.arch` value, everything purireid needs of a backbone.

A backbone is registered by a builder function (the network with random weights and a
torchvision-ResNet-like trunk) and one `Backbone` entry in `BACKBONES`: purireid.model.network
builds the model from it (the builder, the ImageNet weights file, the trunk's modules, the
last-stride surgery), BatchNorm folding (`fold_batchnorm`, the CPU fast path of `purireid
extract`) and the export read its layer names, `purireid doctor` its feature dimension and
weights, and the config schema's `model.arch` choices are this registry's keys
(purireid.config.schema.load_schema).

No torch import at module level: the config check, which runs when Snakemake parses the
workflow, reads the names without paying for torch (~2 s); a builder imports its network's
module when it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHS", "BACKBONES", "Backbone", "resnet_conv_bn_pairs", "torchvision_builder"]

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


def torchvision_builder(name: str) -> Callable[[], Any]:
    """The builder of torchvision's `name` (e.g. "resnet50") with random weights."""

    def build() -> Any:
        from torchvision import models  # when a model is built, not when the registry is read

        return getattr(models, name)(weights=None)

    build.__name__ = build.__qualname__ = name
    return build


@dataclass(frozen=True)
class Backbone:
    """A backbone: how to build it, where its ImageNet weights come from, what it outputs.

    build: a function of no arguments returning the network with random weights; weights: the
    URLs its ImageNet weights are published at, preferred first (for torchvision's,
    IMAGENET1K_V1 first: what `pretrained=True` gave the authors' code); the file is looked
    for in the torch hub cache under the URL's file name, never downloaded; feat_dim: channels
    of the final feature map, the feature dimension; trunk: the child modules that run in
    order from the image to that map (kept under these names on the model, so the published
    state_dict loads key for key); stride_one: the convolutions set to stride 1 for the
    paper's last stride of 1 (module paths); conv_bn_pairs: the convolution + BatchNorm pairs
    that fold into one convolution.
    """

    build: Callable[[], Any]
    weights: tuple[str, ...]
    feat_dim: int
    trunk: tuple[str, ...] = RESNET_TRUNK
    stride_one: tuple[str, ...] = ("layer4.0.conv2", "layer4.0.downsample.0")  # Bottleneck blocks
    conv_bn_pairs: Callable[[Any], list[tuple[Any, str, str]]] = resnet_conv_bn_pairs


_BASIC_BLOCK_STRIDE = ("layer4.0.conv1", "layer4.0.downsample.0")  # BasicBlock: the stride is on conv1

def resnet50_ibn_a() -> Any:
    """ResNet-50-IBN-a (purireid.model.ibn) with random weights."""
    from purireid.model.ibn import resnet50_ibn_a as build  # when a model is built, not when the registry is read

    return build()


def ibn_a_conv_bn_pairs(model: Any) -> list[tuple[Any, str, str]]:
    """`resnet_conv_bn_pairs` less the IBN normalisations (bn1 of layer1..layer3's blocks):
    their InstanceNorm half normalises each image by its own statistics and folds into no
    convolution; the trunk's other BatchNorms fold as ResNet-50's."""
    ibn_blocks = {id(block) for layer in (model.layer1, model.layer2, model.layer3) for block in layer}
    return [pair for pair in resnet_conv_bn_pairs(model) if not (pair[2] == "bn1" and id(pair[0]) in ibn_blocks)]


_TORCHVISION = "https://download.pytorch.org/models/"
_IBN_NET = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"  # the authors' release

BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(torchvision_builder("resnet18"), (_TORCHVISION + "resnet18-f37072fd.pth",), 512,
                         stride_one=_BASIC_BLOCK_STRIDE),
    "resnet34": Backbone(torchvision_builder("resnet34"), (_TORCHVISION + "resnet34-b627a593.pth",), 512,
                         stride_one=_BASIC_BLOCK_STRIDE),
    "resnet50": Backbone(torchvision_builder("resnet50"), (_TORCHVISION + "resnet50-0676ba61.pth",
                                                           _TORCHVISION + "resnet50-11ad3fa6.pth"), 2048),
    "resnet50_ibn_a": Backbone(resnet50_ibn_a, (_IBN_NET + "resnet50_ibn_a-d9d0bb7b.pth",), 2048,
                               conv_bn_pairs=ibn_a_conv_bn_pairs),
}

ARCHS: tuple[str, ...] = tuple(BACKBONES)
