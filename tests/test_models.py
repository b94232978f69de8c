"""Multi-view ResNet (docs/method.md, Model), weight loading and ghost BatchNorm (bn_groups)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from purireid import VIEWS
from purireid.model.batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, set_bn_groups
from purireid.model.network import build_model, imagenet_weights_path

torch.set_num_threads(min(2, torch.get_num_threads()))


def _plain_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorms are torch's own classes again."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, GhostBatchNorm2d):
            m.__class__ = nn.BatchNorm2d
        elif isinstance(m, GhostBatchNorm1d):
            m.__class__ = nn.BatchNorm1d
    return model


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size,fmap", [((256, 128), (16, 8)), ((128, 64), (8, 4))])
def test_output_shapes_resnet18(size, fmap):
    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    assert model.feat_dim == 512
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model.feature_map(x).shape == (2, 512, *fmap)
        out = model(x)
    assert list(out) == list(VIEWS)
    for v in VIEWS:
        assert out[v].shape == (2, 512)
        torch.testing.assert_close(out[v].norm(dim=1), torch.ones(2))


def test_output_shapes_resnet50_last_stride():
    model = build_model("resnet50", "none").eval()
    assert model.feat_dim == 2048
    assert model.layer4[0].conv2.stride == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    assert model.layer3[0].conv2.stride == (2, 2)  # only the last stride changes
    with torch.no_grad():
        fmap = model.feature_map(torch.randn(1, 3, 256, 128))
    assert fmap.shape == (1, 2048, 16, 8)


def test_last_stride_basic_block():
    model = build_model("resnet34", "none")
    assert model.layer4[0].conv1.stride == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    assert model.feat_dim == 512


def test_heads_and_view_split():
    torch.manual_seed(1)
    model = build_model("resnet18", "none")
    for v in VIEWS:
        assert model.pools[v].p.requires_grad and float(model.pools[v].p.detach()) == 3.0
        neck = model.necks[v]
        assert torch.all(neck.weight == 1) and torch.all(neck.bias == 0)
        assert neck.weight.requires_grad and not neck.bias.requires_grad
    assert not hasattr(model, "fc")
    # Odd height (9 rows): upper = rows 0:4, lower = rows 4:8, row 8 is in no part view.
    model.eval()
    x = torch.randn(3, 3, 144, 64)
    with torch.no_grad():
        fmap = model.feature_map(x)
        assert fmap.shape[2] == 9
        out = model(x)
        parts = {"global": fmap, "upper": fmap[:, :, :4], "lower": fmap[:, :, 4:8]}
        for v in VIEWS:
            p = model.pools[v].p
            gem = parts[v].clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
            expected = F.normalize(model.necks[v](gem), dim=1)
            torch.testing.assert_close(out[v], expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_gem_p_and_backbone():
    torch.manual_seed(2)
    model = build_model("resnet18", "none").train()
    out = model(torch.randn(4, 3, 32, 16))
    sum(o.sum() * (i + 1) for i, o in enumerate(out.values())).backward()
    assert all(model.pools[v].p.grad is not None for v in VIEWS)
    assert model.conv1.weight.grad is not None
    assert model.necks["global"].bias.grad is None


# ----------------------------------------------------------------------------- weights


def test_load_state_dict_file(tmp_path):
    torch.manual_seed(3)
    ref = tvm.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", str(path))
    own = model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    # A wrapped, DataParallel-prefixed checkpoint of a whole model loads too.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, wrapped)
    again = build_model("resnet18", str(wrapped))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        build_model("resnet18", str(tmp_path / "missing.pth"))
    path = tmp_path / "r34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected keys"):
        build_model("resnet18", str(path))
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        build_model("resnet18", str(bad))
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet101", "none")


def test_imagenet_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18")[0] == expected
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", "imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(expected) in msg and "path" in msg
    torch.manual_seed(4)
    ref = tvm.resnet18(weights=None)
    expected.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), expected)
    model = build_model("resnet18", "imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, ref.bn1.running_var)
    assert imagenet_weights_path("resnet50")[0].name == "resnet50-0676ba61.pth"


# ----------------------------------------------------------------------------- ghost BN


# 4 groups; the 1-d case has 4 samples per group: with 2, each normalised output is +-1 whatever the
# input, the true input gradient is ~0 (eps alone) and float32 implementations differ by rounding noise.
@pytest.mark.parametrize("cls,shape", [(GhostBatchNorm2d, (8, 5, 3, 2)), (GhostBatchNorm1d, (16, 6))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_equals_separate_passes(cls, shape, momentum):
    torch.manual_seed(5)
    c = shape[1]
    ghost = cls(c, momentum=momentum)
    plain_cls = nn.BatchNorm2d if cls is GhostBatchNorm2d else nn.BatchNorm1d
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
        ghost.running_mean.uniform_(-1, 1)
        ghost.running_var.uniform_(0.5, 2)
    ghost.bn_groups = 4
    plain = [plain_cls(c, momentum=momentum) for _ in range(4)]
    for p in plain:
        p.load_state_dict(ghost.state_dict())
    x = torch.randn(*shape) * 3 + 1
    xg = x.clone().requires_grad_(True)
    n = shape[0] // 4
    xs = [x[n * i : n * i + n].clone().requires_grad_(True) for i in range(4)]
    yg = ghost.train()(xg)
    ys = [p.train()(xi) for p, xi in zip(plain, xs)]
    torch.testing.assert_close(yg, torch.cat(ys), rtol=1e-5, atol=1e-6)
    w = torch.randn_like(yg)
    (yg * w).sum().backward()
    sum((y * w[n * i : n * i + n]).sum() for i, y in enumerate(ys)).backward()
    torch.testing.assert_close(xg.grad, torch.cat([xi.grad for xi in xs]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.weight.grad, sum(p.weight.grad for p in plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.bias.grad, sum(p.bias.grad for p in plain), rtol=1e-5, atol=1e-6)
    # Running stats: those of the first group's pass only.
    torch.testing.assert_close(ghost.running_mean, plain[0].running_mean)
    torch.testing.assert_close(ghost.running_var, plain[0].running_var)
    assert int(ghost.num_batches_tracked) == 1
    # Eval mode is plain BN with the running stats.
    ghost.eval()
    plain[0].eval()
    torch.testing.assert_close(ghost(x), plain[0](x))


def test_ghost_bn_indivisible_batch():
    bn = GhostBatchNorm1d(3)
    bn.bn_groups = 4
    with pytest.raises(ValueError, match="not divisible"):
        bn(torch.randn(6, 3))
    bn.eval()
    assert bn(torch.randn(6, 3)).shape == (6, 3)  # eval ignores groups


def test_model_bn_groups_1_is_plain_bn():
    torch.manual_seed(6)
    model = build_model("resnet18", "none", bn_groups=1).train()
    plain = _plain_bn(model).train()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert all(isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = torch.randn(4, 3, 32, 16)
    out, ref = model(x), plain(x)
    for v in VIEWS:
        assert torch.equal(out[v], ref[v])
    sum(o.sum() for o in out.values()).backward()
    sum(o.sum() for o in ref.values()).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(b, c), name


def test_model_bn_groups_matches_per_group_passes():
    torch.manual_seed(7)
    model = build_model("resnet18", "none", bn_groups=4).train()
    plain = _plain_bn(model).train()
    first_only = _plain_bn(model).train()
    # 4 images per group at 64x32: layer4's BatchNorm then sees 8 values per channel and group (2
    # images at 32x16 leave it 2, a normalisation to +-1 whose float32 rounding decides the output).
    x = torch.randn(16, 3, 64, 32)
    out = model(x)
    parts = [plain(x[4 * i : 4 * i + 4]) for i in range(4)]
    for v in VIEWS:
        torch.testing.assert_close(out[v], torch.cat([p[v] for p in parts]), rtol=1e-4, atol=1e-5)
    # Running stats = those after a plain pass on the first group only.
    first_only(x[:4])
    for (name, b), c in zip(model.named_buffers(), first_only.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


def test_set_bn_groups_in_place():
    torch.manual_seed(8)
    model = build_model("resnet18", "none")
    params = list(model.parameters())
    assert set_bn_groups(model, 2) is model
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert {m.bn_groups for m in model.modules() if isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d))} == {2}
    with pytest.raises(ValueError):
        set_bn_groups(model, 0)
    # Works on a model with torch's own BatchNorms, keeping the parameters.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    w = plain[1].weight
    set_bn_groups(plain, 2)
    assert isinstance(plain[1], GhostBatchNorm2d) and plain[1].weight is w
    assert plain(torch.randn(4, 3, 5, 5)).shape == (4, 4, 3, 3)


# ----------------------------------------------------------------------------- input_norm


def test_per_image_input_norm_undoes_a_colour_cast():
    """A camera's colour cast (a gain and an offset per channel) leaves per_image features
    unchanged, and changes the paper's (imagenet) features."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 32)
    gain = torch.tensor([1.4, 0.7, 1.1]).view(1, 3, 1, 1)
    offset = torch.tensor([0.3, -0.5, 0.2]).view(1, 3, 1, 1)
    cast = x * gain + offset
    for norm, invariant in (("per_image", True), ("imagenet", False)):
        torch.manual_seed(1)
        model = build_model("resnet18", "none", input_norm=norm).eval()
        with torch.no_grad():
            a, b = model(x), model(cast)
        close = all(torch.allclose(a[v], b[v], atol=1e-4) for v in VIEWS)
        assert close == invariant, norm


def test_input_norm_travels_with_the_checkpoint(tmp_path):
    """A per_image model rebuilt from its checkpoint (by the stages and by the API) gives the
    features it gave in training; an unknown value is refused with the choices."""
    from purireid.serving.api import read_checkpoint
    from purireid.config.resolve import resolve_config
    from purireid.io.checkpoints import load_model_checkpoint, save_model_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet18", "none", input_norm="per_image").eval()
    config = resolve_config({"dataset": "synthetic", "model": {"arch": "resnet18", "input_norm": "per_image"},
                             "data": {"height": 64, "width": 32}})
    path = tmp_path / "model.pth"
    save_model_checkpoint(path, model, config)
    x = torch.randn(2, 3, 64, 32) * 2 + 1
    with torch.no_grad():
        want = model(x)["global"]
        for rebuilt in (load_model_checkpoint(path, torch.device("cpu")).eval(),
                        read_checkpoint(path).build_model("cpu")):
            assert rebuilt.input_norm == "per_image"
            torch.testing.assert_close(rebuilt(x)["global"], want)
    with pytest.raises(ValueError, match="per_image"):
        build_model("resnet18", "none", input_norm="grey_world")


def test_backbone_registry_is_the_one_list_of_backbones():
    """model.arch's choices, the feature dimension, the trunk's layers, the last-stride surgery and
    the weights' file names all come from purireid.model.backbones.BACKBONES."""
    from purireid.config.resolve import load_schema
    from purireid.model.backbones import ARCHS, BACKBONES

    assert load_schema()["properties"]["model"]["properties"]["arch"]["enum"] == list(ARCHS) == list(BACKBONES)
    for arch, spec in BACKBONES.items():
        model = build_model(arch, "none").eval()
        assert model.arch == arch and model.trunk_names == spec.trunk
        with torch.no_grad():
            assert model.feature_map(torch.randn(1, 3, 64, 32)).shape[1] == spec.feat_dim == model.feat_dim
        for path in spec.stride_one:
            assert model.get_submodule(path).stride == (1, 1)
        assert [p.name for p in imagenet_weights_path(arch)][0].startswith(arch)
        assert len(spec.conv_bn_pairs(model)) > 0


def test_torchvision_backbones_name_torchvision_weights():
    """The registry's weight URLs of torchvision's backbones are torchvision's own, V1 first (what
    `pretrained=True` gave the authors' code), and the builder is torchvision's network."""
    from purireid.model.backbones import BACKBONES

    for arch in ("resnet18", "resnet34", "resnet50"):
        enum = tvm.get_model_weights(arch)
        published = [enum.IMAGENET1K_V1.url] + ([enum.IMAGENET1K_V2.url] if arch == "resnet50" else [])
        assert list(BACKBONES[arch].weights) == published
        torch.manual_seed(0)
        built = BACKBONES[arch].build()
        torch.manual_seed(0)
        reference = getattr(tvm, arch)(weights=None)
        assert type(built) is type(reference)
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), reference.state_dict().values()))
