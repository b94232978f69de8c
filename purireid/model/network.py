"""Multi-view ResNet of docs/method.md (Model), with optional ghost BatchNorm (``bn_groups``).

Backbones come from the registry purireid.model.backbones (one entry per ``model.arch``:
builder, ImageNet weights, feature dimension, layer names). The trunk's modules keep the
builder's names (``conv1``, ``bn1``, ``layer1`` ...) directly on the model, so the published
state_dict loads into it key for key (its ``fc.*`` entries are dropped: the model has no
classifier).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purireid import VIEWS
from purireid.model.backbones import BACKBONES, Backbone
from purireid.model.batchnorm import set_bn_groups

__all__ = [
    "GeM",
    "INPUT_NORMS",
    "MultiViewResNet",
    "backbone",
    "build_model",
    "fold_batchnorm",
    "imagenet_weights_path",
    "input_norm_of",
    "standardise_per_image",
]


def backbone(arch: str) -> Backbone:
    """The registry entry of `arch` (ValueError naming the choices for an unknown one)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[arch]


# --------------------------------------------------------------------------- model


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (init 3), docs/method.md (Model)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)


def _neck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    nn.init.constant_(bn.weight, 1.0)
    nn.init.constant_(bn.bias, 0.0)
    bn.bias.requires_grad_(False)  # frozen bias, as in the released code
    return bn


INPUT_NORMS = ("imagenet", "per_image")


def standardise_per_image(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Each image's channels to zero mean and unit standard deviation over its pixels.

    A camera's colour cast is, to first order, a gain and an offset per channel; this undoes
    both for every image, so an untrained network no longer matches cameras before people.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def input_norm_of(config: Mapping[str, object]) -> str:
    """The input normalisation a config (e.g. a checkpoint's) asks for; "imagenet" when it
    predates the option."""
    model = config.get("model") if isinstance(config, Mapping) else None
    return str(model.get("input_norm", "imagenet")) if isinstance(model, Mapping) else "imagenet"


class MultiViewResNet(nn.Module):
    """ResNet trunk (last stride 1) + global/upper/lower GeM + BN neck per view.

    ``forward(x)`` returns ``{"global", "upper", "lower"}`` -> L2-normalised ``[B, feat_dim]``.
    ``input_norm``: ``"imagenet"`` takes the (ImageNet-normalised) input as it is (the paper);
    ``"per_image"`` first standardises each image's channels (:func:`standardise_per_image`).
    """

    def __init__(self, arch: str, bn_groups: int = 1, input_norm: str = "imagenet") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {list(INPUT_NORMS)}")
        spec = backbone(arch)
        self.arch, self.input_norm = arch, input_norm
        self.trunk_names = spec.trunk
        trunk = spec.build()
        for path in spec.stride_one:  # last stride 1 (docs/method.md, Model): layer4's strided conv + its shortcut
            trunk.get_submodule(path).stride = (1, 1)
        for name in spec.trunk:
            setattr(self, name, getattr(trunk, name))
        self.feat_dim = spec.feat_dim
        self.pools = nn.ModuleDict({v: GeM(3.0) for v in VIEWS})
        self.necks = nn.ModuleDict({v: _neck(self.feat_dim) for v in VIEWS})
        set_bn_groups(self, bn_groups)

    def feature_map(self, x: Tensor) -> Tensor:
        """The layer4 map ``[B, feat_dim, H/16, W/16]``."""
        if self.input_norm == "per_image":
            x = standardise_per_image(x)
        for name in self.trunk_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        fmap = self.feature_map(x)
        h = fmap.shape[2] // 2
        parts = {"global": fmap, "upper": fmap[:, :, :h], "lower": fmap[:, :, h : 2 * h]}
        return {
            v: F.normalize(self.necks[v](self.pools[v](parts[v])), dim=1) for v in VIEWS
        }


# --------------------------------------------------------------------------- weights


def imagenet_weights_path(arch: str) -> list[Path]:
    """Where :func:`build_model` looks for ImageNet weights, in order of preference.

    ``torch.hub.get_dir()/checkpoints/<the published file's name>`` (the registry's URLs);
    nothing is downloaded.
    """
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return [ckpt_dir / url.rsplit("/", 1)[-1] for url in backbone(arch).weights]


def _unwrap_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state_dict (a mapping name -> tensor)")
    prefix = "module."  # saved from DataParallel / DDP
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in obj.items()}


def _load_backbone(model: MultiViewResNet, state: dict[str, Tensor], source: str) -> None:
    """Load the backbone's state_dict in its published layout (fc ignored) or a full MultiViewResNet one."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    # Files saved before BatchNorm counted its batches have no num_batches_tracked (unused here).
    own_backbone = {k for k in own if k.split(".")[0] in model.trunk_names
                    and not (k.endswith(".num_batches_tracked") and k not in state)}
    head = set(own) - own_backbone
    keys = set(state)
    # Either exactly the backbone, or the backbone plus the views' heads.
    missing = sorted(own_backbone - keys) + sorted((head - keys) if keys & head else [])
    unexpected = sorted(keys - set(own))
    shape_bad = sorted(k for k in keys & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or shape_bad:
        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")

        details = []
        if missing:
            details.append(f"missing keys: {show(missing)}")
        if unexpected:
            details.append(f"unexpected keys: {show(unexpected)}")
        if shape_bad:
            details.append(f"shape mismatch: {show(shape_bad)}")
        raise ValueError(
            f"weights in {source} do not fit this {len(own_backbone)}-tensor backbone "
            f"(wrong arch?): " + "; ".join(details)
        )
    model.load_state_dict(state, strict=False)


def build_model(
    arch: str = "resnet50", pretrained: str = "imagenet", bn_groups: int = 1, input_norm: str = "imagenet"
) -> MultiViewResNet:
    """Build the multi-view ResNet of docs/method.md (Model).

    ``pretrained``: ``"imagenet"`` (the published ImageNet file in the torch hub cache, see
    :func:`imagenet_weights_path`; a clear ``FileNotFoundError`` when absent, never a
    download nor a silent random init), ``"none"`` (random init), or a path to a
    state_dict (the backbone's published layout, or a full MultiViewResNet one). ``input_norm``: see
    :class:`MultiViewResNet` (not part of the weights: a checkpoint records it in its config).
    """
    model = MultiViewResNet(arch, bn_groups=1, input_norm=input_norm)
    pretrained = str(pretrained)

    if pretrained == "none":
        pass
    elif pretrained == "imagenet":
        candidates = imagenet_weights_path(arch)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"ImageNet weights for {arch} not found: place the file {candidates[0].name} "
                f"(published at {backbone(arch).weights[0]}) at {candidates[0]} (the torch hub "
                f"cache; set TORCH_HOME to move it), or give model.pretrained the path of a "
                f"state_dict file instead, or 'none' for a random init. "
                f"Nothing is downloaded."
            )
        if found != candidates[0]:
            warnings.warn(
                f"{candidates[0].name} not found; using {found.name} (other ImageNet "
                f"weights than the paper's)",
                stacklevel=2,
            )
        _load_backbone(model, _unwrap_state_dict(_torch_load(found), str(found)), str(found))
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r}: no such weights file ({path.resolve()}); "
                f"use 'imagenet', 'none' or the path of a state_dict file"
            )
        _load_backbone(model, _unwrap_state_dict(_torch_load(path), str(path)), str(path))

    set_bn_groups(model, bn_groups)
    return model


def _torch_load(path: Path) -> object:
    from purireid.io.files import torch_load  # the one torch.load (weights_only)

    try:
        return torch_load(path)
    except Exception as exc:  # corrupt file, pickle with code, ...
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc


def fold_batchnorm(model: MultiViewResNet) -> MultiViewResNet:
    """The eval-mode model with every trunk BatchNorm2d folded into the convolution before it
    (in place; the views' heads are left alone). Same function up to float rounding. The pairs
    are the backbone registry's (`Backbone.conv_bn_pairs`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for parent, conv, bn in backbone(model.arch).conv_bn_pairs(model):
        parent._modules[conv] = fuse_conv_bn_eval(parent._modules[conv], parent._modules[bn])
        parent._modules[bn] = nn.Identity()
    return model
