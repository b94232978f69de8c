"""ResNet-50-IBN-a (IBN-Net, Pan et al. 2018) as a registered backbone: its structure against the
published IBN-Net-a definition, its weights, ghost BatchNorm, BatchNorm folding, the multi-view
head, the ONNX export, and (slow) a whole tiny run of the workflow with it."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from conftest import REPO
from purireid.io.checkpoints import save_model_checkpoint
from purireid.model.backbones import ARCHS, BACKBONES
from purireid.model.batchnorm import GhostBatchNorm2d, set_bn_groups
from purireid.model.ibn import IBN, resnet50_ibn_a
from purireid.model.network import build_model, fold_batchnorm, imagenet_weights_path

ARCH = "resnet50_ibn_a"


def test_structure_is_ibn_net_a():
    """IN on half the channels after conv1 of every bottleneck in layer1..layer3 (planes 64, 128,
    256), BatchNorm on the rest; the stem and layer4 plain ResNet-50; every parameter shape and
    the parameter count (25.56 M with the 1000-class classifier) those of ResNet-50."""
    net, reference = resnet50_ibn_a(), tvm.resnet50(weights=None)
    assert type(net.bn1) is nn.BatchNorm2d  # the "a" variant leaves the stem alone
    for name, planes in (("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512)):
        for block in getattr(net, name):
            assert type(block.bn2) is type(block.bn3) is nn.BatchNorm2d
            if name == "layer4":
                assert type(block.bn1) is nn.BatchNorm2d and block.bn1.num_features == planes
                continue
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == block.bn1.BN.num_features == planes // 2
            assert block.bn1.IN.affine and not block.bn1.IN.track_running_stats
    assert sum(isinstance(m, IBN) for m in net.modules()) == 3 + 4 + 6
    ours = {k: v.shape for k, v in net.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    renamed = {re.sub(r"\.bn1\.(IN|BN)\.", ".bn1.", k) for k in ours}
    assert renamed == set(theirs)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters()) == 25_557_032


def test_ibn_normalises_half_per_image_half_per_batch():
    torch.manual_seed(0)
    ibn = IBN(8).train()
    x = torch.randn(4, 8, 5, 3) * 3 + 1
    y = ibn(x)
    first, rest = y[:, :4], y[:, 4:]
    assert torch.allclose(first.mean(dim=(2, 3)), torch.zeros(4, 4), atol=1e-5)  # each image, each channel
    assert not torch.allclose(rest.mean(dim=(2, 3)), torch.zeros(4, 4), atol=1e-2)
    assert torch.allclose(rest.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)  # over the batch


def test_multi_view_model_from_the_registry():
    assert ARCH in ARCHS
    model = build_model(ARCH, "none").eval()
    assert model.feat_dim == BACKBONES[ARCH].feat_dim == 2048
    assert model.layer4[0].conv2.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 32))
        fmap = model.feature_map(torch.randn(1, 3, 64, 32))
    assert fmap.shape == (1, 2048, 4, 2)  # last stride 1: a sixteenth of the input
    assert {v: o.shape for v, o in out.items()} == {v: (2, 2048) for v in ("global", "upper", "lower")}


def test_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """The authors' file by its published name in the torch hub cache, never downloaded; a file of
    the published layout (IN / BN keys, no num_batches_tracked, a classifier) loads key for key."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet50_ibn_a-d9d0bb7b.pth"
    assert imagenet_weights_path(ARCH) == [expected]
    with pytest.raises(FileNotFoundError) as err:
        build_model(ARCH, "imagenet")
    assert "resnet50_ibn_a-d9d0bb7b.pth" in str(err.value) and "IBN-Net/releases" in str(err.value)
    torch.manual_seed(3)
    published = resnet50_ibn_a()
    for m in published.modules():  # statistics that differ from the init, to see them arrive
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_()
    state = {k: v for k, v in published.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "layer1.0.bn1.IN.weight" in state and "layer3.5.bn1.BN.running_var" in state and "fc.weight" in state
    expected.parent.mkdir(parents=True)
    torch.save(state, expected)
    model = build_model(ARCH, "imagenet")
    assert torch.equal(model.layer2[1].bn1.IN.weight, published.layer2[1].bn1.IN.weight)
    assert torch.equal(model.layer3[0].bn1.BN.running_mean, published.layer3[0].bn1.BN.running_mean)
    assert torch.equal(model.layer4[2].conv3.weight, published.layer4[2].conv3.weight)


def test_ghost_batchnorm_groups_the_batch_part_only():
    """bn_groups turns IBN's BatchNorm half into group BatchNorm; the InstanceNorm half is per image
    already. Training-mode outputs of a batch of two groups are those of each group alone."""
    torch.manual_seed(1)
    grouped = build_model(ARCH, "none", bn_groups=2).train()
    single = set_bn_groups(copy.deepcopy(grouped), 1)
    ibn = grouped.layer1[0].bn1
    assert type(ibn.BN) is GhostBatchNorm2d and ibn.BN.bn_groups == 2 and type(ibn.IN) is nn.InstanceNorm2d
    grouped, single = grouped.double(), single.double()  # float64: compare the functions, not roundings
    x = torch.randn(6, 3, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        both = grouped(x)
        halves = [single(x[:3]), single(x[3:])]
    for view, got in both.items():
        torch.testing.assert_close(got, torch.cat([h[view] for h in halves]), rtol=1e-9, atol=1e-9)


def test_fold_batchnorm_keeps_the_instance_norm():
    torch.manual_seed(2)
    model = build_model(ARCH, "none").eval()
    for m in model.modules():  # non-trivial statistics, so a wrong fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        want = model(x)
        folded = fold_batchnorm(model)
        got = folded(x)
    ibn_halves = {id(m.BN) for m in folded.modules() if isinstance(m, IBN)}
    assert {id(m) for m in folded.modules() if isinstance(m, nn.BatchNorm2d)} == ibn_halves  # the rest folded
    assert len(ibn_halves) == 13
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in folded.modules()) == 13
    for view in want:
        torch.testing.assert_close(got[view], want[view], rtol=1e-4, atol=1e-5)


def test_onnx_export_parity(tmp_path):
    from conftest import tiny_config
    from purireid.serving.export import export_model

    config = tiny_config(tmp_path / "data", model={"arch": ARCH})
    torch.manual_seed(5)
    model = build_model(ARCH, "none")
    path = tmp_path / "model.pth"
    save_model_checkpoint(path, model, config)
    report = export_model(path, tmp_path / "model.onnx", fmt="onnx")
    assert (tmp_path / "model.onnx").is_file() and report.max_abs_diff <= 1e-4


def test_adding_the_backbone_touched_only_the_registry():
    """No module of purireid names the IBN backbone but the registry and the network's own module:
    the model, ghost BatchNorm, folding, checkpoints, export and the schema take it from the registry."""
    naming = sorted(str(p.relative_to(REPO)) for p in (REPO / "purireid").rglob("*")
                    if p.is_file() and p.suffix in (".py", ".yaml") and re.search(r"ibn", p.read_text(), re.I))
    assert naming == ["purireid/model/backbones.py", "purireid/model/ibn.py"]


@pytest.mark.slow
def test_trains_through_the_whole_workflow(tmp_path):
    """The tiny config with model.arch: resnet50_ibn_a through every rule (one epoch), then the
    trained student exports to ONNX with parity."""
    from purireid.serving.export import export_model
    from test_workflow import TINY, snakemake, write_yaml

    overrides = write_yaml(tmp_path / "ibn.yaml", {"model": {"arch": ARCH}, "train": {"epochs": 1}})
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), str(overrides))
    base = tmp_path / "results" / "synthetic"
    for model in ("teacher", "student"):
        metrics = json.loads((base / model / "eval.json").read_text())
        assert 0.0 <= metrics["mAP"] <= 1.0
        resolved = (base / model / "config.yaml").read_text()
        assert f"arch: {ARCH}" in resolved
    checkpoint = base / "student" / "model.pth"
    report = export_model(checkpoint, tmp_path / "student.onnx", fmt="onnx")
    assert report.max_abs_diff <= 1e-4
