"""Cluster-contrast memory, distillation and the views' weights of the purification loss
(docs/method.md); the loss terms sum them with purireid.training.terms.weighted_view_sum."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purireid import VIEWS

__all__ = ["CameraProxyMemory", "ClusterMemory", "camera_proxy_labels", "distillation_loss", "sequential_update_",
           "view_weights"]


class ClusterMemory(nn.Module):
    """One view's memory of cluster centres (docs/method.md, Memories and losses).

    ``forward(features, targets)``: cross-entropy of ``features @ memory.T / temperature``
    against the pseudo labels; the memory gets no gradient (it is a buffer).
    ``update(features, targets)``: momentum update, sample by sample in batch order:
    ``m_y <- momentum * m_y + (1 - momentum) * x``, then ``m_y <- m_y / |m_y|``.
    ``momentum == 1.0`` freezes the memory (the student's epoch -1).
    """

    def __init__(self, centres: Tensor, temperature: float = 0.05, momentum: float = 0.1) -> None:
        super().__init__()
        if centres.ndim != 2 or centres.shape[0] == 0:
            raise ValueError(f"centres must be a non-empty [C, D] tensor, got {tuple(centres.shape)}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        # The C centres plus one scratch row: a round of the update writes every position of
        # the batch, those outside the round into the scratch row (no data-dependent indexing).
        table = centres.detach().float()
        self.register_buffer("table", torch.cat([table, table.new_zeros(1, table.shape[1])]))
        # Occurrences a fixed number of rounds left out (counted on the device, read once per epoch).
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long, device=table.device))

    @property
    def memory(self) -> Tensor:
        """The [C, D] centres (a view of the table without its scratch row)."""
        return self.table[:-1]

    @property
    def num_clusters(self) -> int:
        return int(self.table.shape[0]) - 1

    def logits(self, features: Tensor) -> Tensor:
        return features.float() @ self.memory.T / self.temperature

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(features), targets.to(self.table.device).long())

    @torch.no_grad()
    def update(self, features: Tensor, targets: Tensor, *, rounds: int | None = None) -> None:
        """Sequential momentum update in batch order. `rounds`: the most images of one label the
        batch can hold (train.num_instances for the sampler's batches): then the update reads no
        value back from the device; occurrences beyond it are counted in `skipped` (see
        `raise_if_rounds_overflowed`). None: worked out from `targets`, checking their range."""
        if self.momentum == 1.0:  # frozen: leave the memory bit-for-bit unchanged
            return
        self.skipped += sequential_update_(self.table, features, targets, self.momentum, rounds)

    def raise_if_rounds_overflowed(self, key: str) -> None:
        """After an epoch of `update(rounds=...)`: raise if a batch held more images of one label
        than the rounds (`key`: the config key that set them)."""
        skipped = int(self.skipped)
        if skipped:
            raise RuntimeError(f"{skipped} memory updates were skipped: a batch held more images of one "
                               f"pseudo-identity than {key}")


@torch.no_grad()
def sequential_update_(table: Tensor, features: Tensor, targets: Tensor, momentum: float,
                       rounds: int | None) -> Tensor:
    """`ClusterMemory.update` on a table [..., C + 1, D] (last row: scratch) from features
    [..., B, D] with the same leading dimensions (several memories that share their targets, e.g.
    the views' memories stacked, in one pass) and targets [B], in place. Returns how many
    occurrences `rounds` left out (a device tensor; 0 when `rounds` is None: worked out).

    The sequential update only chains samples that share a label; different labels touch
    different rows and commute. So it runs in "rounds": round r updates, in one batched step,
    the r-th occurrence (in batch order) of every label; positions outside the round write the
    scratch row. Same arithmetic per row as the sample-by-sample loop; rounds = the largest
    multiplicity (16 for a 16 x 16 batch) instead of 256 steps.
    """
    x = features.to(device=table.device, dtype=table.dtype)
    y = targets.to(table.device).long()
    if x.shape[-2] != y.shape[0]:
        raise ValueError(f"{x.shape[-2]} features but {y.shape[0]} targets")
    scratch = table.shape[-2] - 1
    if y.shape[0] == 0:
        return torch.zeros((), dtype=torch.long, device=table.device)
    occurrence = _occurrence_rank(y)
    if rounds is None:
        if int(y.min()) < 0 or int(y.max()) >= scratch:
            raise ValueError(f"targets must lie in [0, {scratch}), got {y.min()}..{y.max()}")
        rounds = int(occurrence.max()) + 1
        skipped = torch.zeros((), dtype=torch.long, device=table.device)
    else:
        skipped = (occurrence >= rounds).sum()
    x = x * (1.0 - momentum)
    # The rows each round writes (labels are unique within a round), all rounds at once.
    rows = torch.where(occurrence == torch.arange(rounds, device=y.device).unsqueeze(1), y, scratch)
    for r in range(rounds):
        m = table.index_select(-2, y) * momentum + x
        table.index_copy_(-2, rows[r], m / m.norm(dim=-1, keepdim=True))
    return skipped


def camera_proxy_labels(labels: np.ndarray, camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The camera proxies of an epoch's labels: one per (class, camera) pair that occurs.

    Returns (proxy of every record, -1 where its label is -1; each proxy's class; each proxy's
    camera), proxies numbered in sorted (class, camera) order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    camids = np.asarray(camids, dtype=np.int64)
    if labels.shape != camids.shape:
        raise ValueError(f"{labels.shape[0]} labels but {camids.shape[0]} camera ids")
    proxy = np.full(labels.shape, -1, dtype=np.int64)
    kept = labels >= 0
    pairs, proxy[kept] = np.unique(np.stack([labels[kept], camids[kept]], axis=1), axis=0, return_inverse=True)
    pairs = pairs.reshape(-1, 2)
    return proxy, pairs[:, 0].copy(), pairs[:, 1].copy()


class CameraProxyMemory(nn.Module):
    """One view's camera-aware proxies: a memory row per (class, camera) pair, and the
    inter-camera contrastive term (after CAP, Wang et al., AAAI 2021) that pulls an image
    towards every camera's proxy of its class against the hardest other classes' proxies.

    The cluster memory's centres are dominated by the cameras a class has most images from;
    this term weighs each camera's view of a class equally, so features must agree across
    cameras. Loss of image x with class y: ``mean over p in P(y) of
    -log(exp(x.p/t) / sum over u in P(y) + N_k(x) of exp(x.u/t))``, P(y) the proxies of y,
    N_k(x) the `hard_negatives` proxies of other classes most similar to x. Update: the
    momentum update of `ClusterMemory` on each image's own (class, camera) proxy.
    """

    def __init__(self, centres: Tensor, proxy_classes: Tensor | np.ndarray, *, temperature: float = 0.05,
                 momentum: float = 0.1, hard_negatives: int = 50) -> None:
        super().__init__()
        if hard_negatives < 1:
            raise ValueError(f"hard_negatives must be >= 1, got {hard_negatives}")
        self.proxies = ClusterMemory(centres, temperature=temperature, momentum=momentum)
        classes = torch.as_tensor(np.asarray(proxy_classes), dtype=torch.long, device=self.proxies.memory.device)
        if classes.shape != (self.proxies.num_clusters,):
            raise ValueError(f"{classes.shape[0]} proxy classes for {self.proxies.num_clusters} proxies")
        self.register_buffer("proxy_classes", classes)
        self.hard_negatives = int(hard_negatives)

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        sims = self.proxies.logits(features)  # [B, P]
        positive = self.proxy_classes.unsqueeze(0) == targets.to(sims.device).long().unsqueeze(1)
        # The k most similar proxies of other classes; a row with fewer gets -inf entries, which
        # add nothing, so each image's term does not depend on the rest of the batch (as DDP needs).
        k = min(self.hard_negatives, sims.shape[1])
        negatives = sims.masked_fill(positive, float("-inf")).topk(k, dim=1).values
        log_norm = torch.logsumexp(torch.cat([sims.masked_fill(~positive, float("-inf")), negatives], dim=1), dim=1)
        mean_positive = (sims * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
        return (log_norm - mean_positive).mean()

    @torch.no_grad()
    def update(self, features: Tensor, proxy_targets: Tensor, *, rounds: int | None = None) -> None:
        self.proxies.update(features, proxy_targets, rounds=rounds)


def _occurrence_rank(y: Tensor) -> Tensor:
    """For each position i, how many j < i have y[j] == y[i]."""
    n = y.shape[0]
    order = torch.sort(y, stable=True).indices  # same labels together, batch order kept
    ys = y[order]
    pos = torch.arange(n, device=y.device)
    new_run = torch.ones(n, dtype=torch.bool, device=y.device)
    new_run[1:] = ys[1:] != ys[:-1]
    run_start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - run_start
    return rank


def distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Batch mean of the squared L2 distance ``|s - t|^2`` (docs/method.md). No gradient to the teacher."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    diff = student.float() - teacher.detach().float()
    return diff.pow(2).sum(dim=1).mean()


def view_weights(lambda2: float = 0.2) -> dict[str, float]:
    """``(1 - lambda2, lambda2, lambda2)``: sums to 1 + lambda2, as in the released code."""
    return {"global": 1.0 - lambda2, "upper": lambda2, "lower": lambda2}
