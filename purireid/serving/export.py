"""Export a trained model to TorchScript or ONNX, with a parity check against PyTorch.

The exported graph is the inference path of purireid.model.network.MultiViewResNet: input float32
[B, 3, H, W], RGB, ImageNet-normalised (mean 0.485/0.456/0.406, std 0.229/0.224/0.225), H x W
the checkpoint's input size, any batch size B >= 1; output the L2-normalised global feature
[B, D] (outputs "global", "upper", "lower" with views="all"). A model trained with
`model.input_norm: per_image` standardises each image inside the exported graph, so its input
is the same.

ONNX: torch.onnx's exporter (torch.export-based; needs the `onnx` and `onnxscript` packages),
opset `ONNX_OPSET` (18) unless asked otherwise, the batch dimension dynamic; checked with
onnxruntime. TorchScript: torch.jit.trace (PyTorch marks TorchScript deprecated, but it loads
with a bare `torch.jit.load` and no purireid). The input size, normalisation, views and the
checkpoint's sha256 travel inside both files (ONNX metadata_props, a TorchScript extra file
"purireid.json").

Parity: the exported model and the PyTorch model run on the same batch of PARITY_BATCH random
images (not the batch size the export traced, so the dynamic batch is exercised); the file is
renamed into place only if the largest absolute difference of the normalised features is within
`tolerance` (default 1e-4).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from purireid.serving.api import Checkpoint, InputError, read_checkpoint, resolve_views
from purireid.model.network import input_norm_of, standardise_per_image

__all__ = ["EXPORT_FORMATS", "ONNX_OPSET", "ExportReport", "ExportedFeatures", "ParityError", "export_model"]

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
TRACE_BATCH = 2
PARITY_BATCH = 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ParityError(RuntimeError):
    """The exported model's features differ from PyTorch's beyond the tolerance."""


class ExportedFeatures(nn.Module):
    """The views' heads over the backbone, as plain attributes.

    torch.export (under the ONNX exporter) writes module paths into Python source, where the
    model's `pools["global"]` would read `pools.global`, a syntax error; so the modules are
    re-registered here under list indices. Same computation as MultiViewResNet.forward.
    """

    def __init__(self, model: nn.Module, views: tuple[str, ...]) -> None:
        super().__init__()
        from purireid.model.network import MultiViewResNet

        if not isinstance(model, MultiViewResNet):
            raise TypeError(f"expected a MultiViewResNet, got {type(model).__name__}")
        self.views = views
        self.standardise = model.input_norm == "per_image"  # model.input_norm, inside the exported graph
        self.trunk = nn.Sequential(*(getattr(model, name) for name in model.trunk_names))
        self.view_pools = nn.ModuleList(model.pools[v] for v in views)
        self.view_necks = nn.ModuleList(model.necks[v] for v in views)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.standardise:
            images = standardise_per_image(images)
        fmap = self.trunk(images)
        h = fmap.shape[2] // 2
        parts = {"global": fmap, "upper": fmap[:, :, :h], "lower": fmap[:, :, h:2 * h]}
        return tuple(F.normalize(neck(pool(parts[v])), dim=1)
                     for v, pool, neck in zip(self.views, self.view_pools, self.view_necks))


@dataclass
class ExportReport:
    path: Path
    format: str
    views: tuple[str, ...]
    input_size: tuple[int, int]
    opset: int | None
    max_abs_diff: float
    tolerance: float


def _metadata(ckpt: Checkpoint, views: tuple[str, ...], fmt: str, opset: int | None) -> dict:
    return {
        "producer": "purireid", "format": fmt, "opset": opset, "arch": ckpt.arch, "feat_dim": ckpt.feat_dim,
        "input": {"layout": "NCHW", "channels": "RGB", "dtype": "float32", "height": ckpt.input_size[0],
                  "width": ckpt.input_size[1], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "resize": "bicubic", "per_image_standardisation": input_norm_of(ckpt.config) == "per_image"},
        "outputs": list(views), "l2_normalised": True, "checkpoint_sha256": ckpt.sha256,
    }


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, views: tuple[str, ...],
                 opset: int, meta: dict) -> None:
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise InputError(f"ONNX export needs the onnx and onnxscript packages ({exc}); "
                         "pip install 'purireid[export]'") from None
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress chatter and deprecations
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["images"],
                                    output_names=list(views), opset_version=opset,
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    program.model.metadata_props["purireid"] = json.dumps(meta)
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is marked deprecated in recent PyTorch
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"purireid.json": json.dumps(meta)})


def _run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[np.ndarray]:
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("the ONNX parity check needs onnxruntime; pip install 'purireid[export]'") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return list(session.run(None, {"images": images.numpy()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return [o.numpy() for o in loaded(images)]


def export_model(checkpoint: str | Path | Checkpoint, out: str | Path, *, fmt: str = "onnx",
                 views: str = "global", opset: int = ONNX_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 seed: int = 0) -> ExportReport:
    """Export `checkpoint` to `out` and check parity; the file appears only if parity holds."""
    from purireid.io.files import atomic_path

    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and opset < ONNX_OPSET:
        raise InputError(f"opset {opset}: torch's ONNX exporter writes opset {ONNX_OPSET} or newer")
    if not tolerance > 0:
        raise InputError(f"tolerance must be > 0, got {tolerance}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    wanted = resolve_views(views)
    model = ckpt.build_model("cpu")
    wrapper = ExportedFeatures(model, wanted).eval()
    height, width = ckpt.input_size
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(TRACE_BATCH, 3, height, width, generator=gen)
    images = torch.randn(PARITY_BATCH, 3, height, width, generator=gen)
    meta = _metadata(ckpt, wanted, fmt, opset if fmt == "onnx" else None)
    out = Path(out)
    # A temporary name with the right suffix: onnxruntime and torch.jit read it for the check.
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + out.suffix)
        try:
            if fmt == "onnx":
                _export_onnx(wrapper, example, staged, wanted, opset, meta)
            else:
                _export_torchscript(wrapper, example, staged, meta)
            with torch.no_grad():
                reference = [model(images)[v].numpy() for v in wanted]
            exported = _run_exported(staged, fmt, images)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(exported, reference))
            if not diff <= tolerance:  # NaN fails too
                raise ParityError(
                    f"{fmt} export of {ckpt.path}: max abs difference {diff:.3g} from PyTorch on normalised "
                    f"features exceeds the tolerance {tolerance:g}; {out} was not written")
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return ExportReport(path=out, format=fmt, views=wanted, input_size=(height, width),
                        opset=opset if fmt == "onnx" else None, max_abs_diff=diff, tolerance=tolerance)

