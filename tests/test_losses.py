"""Cluster memory, distillation and the fused loss the loop sums (purireid.training.terms.weighted_view_sum;
docs/method.md, Memories and losses; Distillation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from purireid import VIEWS
from purireid.training.losses import (
    CameraProxyMemory,
    ClusterMemory,
    camera_proxy_labels,
    _occurrence_rank,
    distillation_loss,
    view_weights,
)
from purireid.training.terms import weighted_view_sum


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def reference_update(memory, features, targets, momentum):
    """The released code's loop, sample by sample in batch order."""
    m = memory.clone()
    for x, y in zip(features, targets.tolist()):
        m[y] = momentum * m[y] + (1.0 - momentum) * x
        m[y] = m[y] / m[y].norm()
    return m


def test_memory_loss_and_gradient_vs_manual():
    centres = _unit(5, 8, seed=1)
    feats = _unit(6, 8, seed=2).requires_grad_(True)
    targets = torch.tensor([0, 3, 3, 4, 1, 0])
    mem = ClusterMemory(centres, temperature=0.05)
    loss = mem(feats, targets)
    loss.backward()
    # By hand: mean over the batch of -log softmax(f . m / tau)[y].
    logits = feats.detach().double() @ centres.double().T / 0.05
    p = torch.softmax(logits, dim=1)
    manual = -torch.log(p[torch.arange(6), targets]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # d loss / d f_i = (p_i - onehot_i) @ M / tau / B
    grad = (p - F.one_hot(targets, 5).double()) @ centres.double() / 0.05 / 6
    torch.testing.assert_close(feats.grad.double(), grad, rtol=1e-4, atol=1e-6)
    assert "table" in dict(mem.named_buffers()) and mem.memory.shape == centres.shape
    assert list(mem.parameters()) == []


def test_update_by_hand():
    mem = ClusterMemory(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), momentum=0.5)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    mem.update(x, torch.tensor([0, 0, 1]))
    # row 0: [1,0] -> [.5,.5]/|.| = [s, s]; then .5*[s,s] + .5*[0,1] renormalised
    s = 1 / math.sqrt(2)
    a = torch.tensor([0.5 * s, 0.5 * s + 0.5])
    torch.testing.assert_close(mem.memory[0], a / a.norm())
    torch.testing.assert_close(mem.memory[1], torch.tensor([s, s]))


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0])
def test_update_equals_sequential_loop_with_repeated_labels(momentum):
    centres = _unit(7, 16, seed=3)
    feats = _unit(40, 16, seed=4)
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(0, 7, (40,), generator=g)
    targets[:5] = 2  # a run of repeats at the start, and more later
    targets[-3:] = 2
    mem = ClusterMemory(centres, momentum=momentum)
    mem.update(feats, targets)
    ref = reference_update(centres, feats, targets, momentum)
    torch.testing.assert_close(mem.memory, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(mem.memory.norm(dim=1), torch.ones(7))
    if momentum == 0.0:  # the last sample of each label wins
        for c in targets.unique().tolist():
            last = (targets == c).nonzero()[-1, 0]
            torch.testing.assert_close(mem.memory[c], feats[last])


def test_update_order_matters_and_is_batch_order():
    centres = _unit(2, 4, seed=6)
    a, b = _unit(2, 4, seed=7)
    m1 = ClusterMemory(centres, momentum=0.3)
    m1.update(torch.stack([a, b]), torch.tensor([1, 1]))
    m2 = ClusterMemory(centres, momentum=0.3)
    m2.update(torch.stack([b, a]), torch.tensor([1, 1]))
    assert not torch.allclose(m1.memory[1], m2.memory[1])
    torch.testing.assert_close(m1.memory, reference_update(centres, torch.stack([a, b]), torch.tensor([1, 1]), 0.3))
    assert torch.equal(m1.memory[0], centres[0])  # untouched cluster


def test_momentum_one_is_frozen():
    centres = _unit(4, 8, seed=8)
    mem = ClusterMemory(centres, momentum=1.0)
    mem.update(_unit(10, 8, seed=9), torch.randint(0, 4, (10,)))
    assert torch.equal(mem.memory, centres)
    # ... and the memory is a copy: the caller's centres are never modified.
    mem2 = ClusterMemory(centres, momentum=0.1)
    before = centres.clone()
    mem2.update(_unit(10, 8, seed=9), torch.randint(0, 4, (10,)))
    assert torch.equal(centres, before)


def test_update_validation():
    mem = ClusterMemory(_unit(3, 4), momentum=0.1)
    with pytest.raises(ValueError):
        mem.update(_unit(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        mem.update(_unit(2, 4), torch.tensor([0]))
    mem.update(_unit(0, 4), torch.zeros(0, dtype=torch.long))  # empty batch: no-op
    with pytest.raises(ValueError):
        ClusterMemory(_unit(3, 4), momentum=1.5)


def test_update_with_the_samplers_rounds_equals_the_checked_update():
    """The trainer passes rounds = train.num_instances (no value read back from the device): the
    memory is bit-for-bit that of the update that works the rounds out, and of the sequential loop."""
    centres = _unit(6, 8, seed=12)
    feats = _unit(12, 8, seed=13)
    targets = torch.tensor([2, 5, 2, 0, 5, 2, 1, 0, 2, 5, 1, 3])  # at most 4 of one label
    checked, fixed = ClusterMemory(centres, momentum=0.3), ClusterMemory(centres, momentum=0.3)
    checked.update(feats, targets)
    fixed.update(feats, targets, rounds=6)  # more rounds than needed: the extra ones write nothing
    assert torch.equal(checked.memory, fixed.memory)
    torch.testing.assert_close(fixed.memory, reference_update(centres, feats, targets, 0.3))
    fixed.raise_if_rounds_overflowed("train.num_instances")  # nothing skipped

    short = ClusterMemory(centres, momentum=0.3)
    short.update(feats, targets, rounds=3)  # label 2's fourth image is left out, and counted
    with pytest.raises(RuntimeError, match="1 memory updates were skipped.*train.num_instances"):
        short.raise_if_rounds_overflowed("train.num_instances")


def test_the_memory_term_updates_all_views_at_once_as_each_view_alone():
    """The memory term's one pass over the stacked views' tables gives each view's memory bit for
    bit the update of that view alone (and overflowing rounds are counted once, per occurrence)."""
    from purireid.training.terms import EpochTargets, GatheredBatch
    from purireid.training.terms.memory import MemoryTerm

    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    features = {v: _unit(10, 8, seed=20 + i) for i, v in enumerate(VIEWS)}
    term = MemoryTerm(temperature=0.05, rounds=2)
    term.start_epoch(EpochTargets(labels, features, labels * 0, 5, 0.2, torch.device("cpu")))
    alone = {v: ClusterMemory(term.memories[v].memory.clone(), momentum=0.2) for v in VIEWS}
    indices = torch.tensor([3, 2, 0, 1, 6, 2, 9])  # label 1 three times: one occurrence past 2 rounds
    batch = {v: _unit(7, 8, seed=30 + i) for i, v in enumerate(VIEWS)}
    term.after_step(GatheredBatch(batch, indices))
    for v in VIEWS:
        alone[v].update(batch[v], torch.from_numpy(labels)[indices], rounds=2)
        assert torch.equal(term.memories[v].memory, alone[v].memory), v
    with pytest.raises(RuntimeError, match="^1 memory updates were skipped"):
        term.end_epoch()


def test_occurrence_rank():
    y = torch.tensor([3, 1, 3, 3, 0, 1, 7])
    assert _occurrence_rank(y).tolist() == [0, 0, 1, 2, 0, 1, 0]


def test_distillation_loss():
    s = _unit(5, 6, seed=10).requires_grad_(True)
    t = _unit(5, 6, seed=11).requires_grad_(True)
    loss = distillation_loss(s, t)
    manual = sum(((s[i] - t[i]) ** 2).sum() for i in range(5)) / 5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / 5)
    assert t.grad is None  # the teacher is never trained
    # Unit vectors: |s - t|^2 = 2 - 2 cos.
    cos = (s * t).sum(1).detach()
    assert loss.item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)


def purification_loss(ce, distill=None, *, lambda2=0.2, mu=1.0):
    """The loss the loop sums (`weighted_view_sum`): the memory cross-entropy (weight 1), plus the
    distillation (weight mu) for the student, weighted per view."""
    parts = [(1.0, ce)] + ([] if distill is None else [(mu, distill)])
    return weighted_view_sum(parts, view_weights(lambda2))


def test_purification_loss_weights():
    assert view_weights(0.2) == pytest.approx({"global": 0.8, "upper": 0.2, "lower": 0.2})
    ones = {v: torch.tensor(1.0) for v in VIEWS}
    assert purification_loss(ones).item() == pytest.approx(1.2)  # weights sum to 1 + lambda2
    ce = {"global": torch.tensor(2.0), "upper": torch.tensor(3.0), "lower": torch.tensor(5.0)}
    d = {"global": torch.tensor(7.0), "upper": torch.tensor(11.0), "lower": torch.tensor(13.0)}
    assert purification_loss(ce).item() == pytest.approx(0.8 * 2 + 0.2 * 3 + 0.2 * 5)
    full = 0.8 * (2 + 0.5 * 7) + 0.2 * (3 + 0.5 * 11) + 0.2 * (5 + 0.5 * 13)
    assert purification_loss(ce, d, mu=0.5).item() == pytest.approx(full)
    assert purification_loss(ce, d, lambda2=0.3).item() == pytest.approx(0.7 * 9 + 0.3 * 14 + 0.3 * 18)
    # mu = 0 is the teacher loss
    assert purification_loss(ce, d, mu=0.0).item() == purification_loss(ce).item()
    with pytest.raises(ValueError, match="no loss term is active"):
        weighted_view_sum([], view_weights(0.2))


def test_end_to_end_gradients_flow_to_features_only():
    feats = {v: _unit(8, 4, seed=20 + i).requires_grad_(True) for i, v in enumerate(VIEWS)}
    teacher = {v: _unit(8, 4, seed=30 + i) for i, v in enumerate(VIEWS)}
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mems = {v: ClusterMemory(_unit(3, 4, seed=40 + i)) for i, v in enumerate(VIEWS)}
    ce = {v: mems[v](feats[v], targets) for v in VIEWS}
    dist = {v: distillation_loss(feats[v], teacher[v]) for v in VIEWS}
    loss = purification_loss(ce, dist)
    loss.backward()
    assert all(feats[v].grad is not None and feats[v].grad.abs().sum() > 0 for v in VIEWS)
    before = {v: mems[v].memory.clone() for v in VIEWS}
    for v in VIEWS:
        mems[v].update(feats[v], targets)  # takes grad-requiring tensors, updates without grad
        assert not mems[v].memory.requires_grad
        assert not torch.equal(mems[v].memory, before[v])


# ---------------------------------------------------------------- camera proxies (train.camera_proxy)


def test_camera_proxy_labels_one_proxy_per_class_and_camera():
    labels = np.array([0, 0, 1, 1, 2, -1, 2, 0])
    cams = np.array([0, 1, 0, 0, 1, 1, 2, 0])
    proxy, classes, proxy_cams = camera_proxy_labels(labels, cams)
    # proxies in (class, camera) order: (0,0) (0,1) (1,0) (2,1) (2,2); the outlier keeps -1
    assert proxy.tolist() == [0, 1, 2, 2, 3, -1, 4, 0]
    assert classes.tolist() == [0, 0, 1, 2, 2] and proxy_cams.tolist() == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="camera ids"):
        camera_proxy_labels(labels, cams[:-1])


def test_camera_proxy_loss_vs_manual_with_hard_negatives():
    proxies = _unit(6, 8, seed=3)
    classes = torch.tensor([0, 0, 1, 1, 2, 3])  # classes 0 and 1 seen by two cameras
    feats = _unit(4, 8, seed=4)
    targets = torch.tensor([0, 1, 2, 0])
    mem = CameraProxyMemory(proxies, classes, temperature=0.1, hard_negatives=2)
    sims = (feats.double() @ proxies.double().T / 0.1)
    manual = []
    for i, y in enumerate(targets.tolist()):
        pos = sims[i][classes == y]
        neg = sims[i][classes != y].topk(2).values  # only the two hardest other proxies
        log_norm = torch.logsumexp(torch.cat([pos, neg]), 0)
        manual.append((log_norm - pos).mean())
    assert mem(feats, targets).item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)
    # An image's term does not depend on the rest of the batch (DDP splits batches), also when
    # its class has fewer other-class proxies than hard_negatives.
    wide = CameraProxyMemory(proxies, classes, temperature=0.1, hard_negatives=50)
    whole = torch.stack([wide(feats[i:i + 1], targets[i:i + 1]) for i in range(4)]).mean()
    assert wide(feats, targets).item() == pytest.approx(whole.item(), rel=1e-6)


def test_camera_proxy_gradient_pulls_towards_the_other_cameras_proxy():
    """An image at its own camera's proxy is still pulled towards its class's proxy in the
    other camera: the term that makes features agree across cameras."""
    proxies = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mem = CameraProxyMemory(proxies, torch.tensor([0, 0, 1]), temperature=0.5)
    x = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)  # class 0, camera A's proxy
    mem(x, torch.tensor([0])).backward()
    step = -x.grad[0]
    assert step[1] > 0  # towards class 0's proxy in camera B
    assert step[2] < 0  # away from class 1


def test_camera_proxy_update_moves_only_the_own_proxy():
    proxies = torch.eye(4)[:3]
    mem = CameraProxyMemory(proxies, torch.tensor([0, 0, 1]), momentum=0.5)
    mem.update(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([1]))
    assert torch.equal(mem.proxies.memory[[0, 2]], proxies[[0, 2]])
    torch.testing.assert_close(mem.proxies.memory[1], F.normalize(torch.tensor([0.0, 0.5, 0.0, 0.5]), dim=0))
    with pytest.raises(ValueError, match="proxy classes"):
        CameraProxyMemory(proxies, torch.tensor([0, 1]))
