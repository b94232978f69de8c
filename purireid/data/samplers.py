"""Multi-instance identity samplers driven by pseudo labels (docs/method.md, Hyperparameters).

One *pass* visits every pseudo-id once in random order: one random anchor image, then
num_instances - 1 more images of the same pseudo-id, preferably from cameras other than the
anchor's (camera-aware) or from any of its other images (camera-agnostic). As in the
released code, the extra images are drawn without replacement only when there are at least
num_instances candidates (not num_instances - 1), and a pseudo-id with a single image
contributes only its anchor. Outliers (label -1) are never sampled.

An epoch's batches are consecutive passes, each cut to whole batches (the DataLoader's
drop_last), until `iters` batches exist.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def epoch_rng(seed: int, epoch: int, stream: int, *more: int) -> np.random.Generator:
    """Generator determined by (seed, epoch, stream, ...) only; epoch may be negative (-1)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, (epoch + (1 << 31)) & 0xFFFFFFFF, stream, *more])


class MultiInstanceSampler:
    """Pseudo-id multi-instance sampler; `camera_aware` prefers other cameras of the anchor's id."""

    def __init__(self, labels: ArrayLike, camids: ArrayLike, num_instances: int, *,
                 camera_aware: bool = True) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        camids = np.asarray(camids, dtype=np.int64)
        if labels.shape != camids.shape or labels.ndim != 1:
            raise ValueError(f"labels {labels.shape} and camids {camids.shape} must be equal 1-d shapes")
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.labels, self.camids = labels, camids
        self.num_instances = num_instances
        self.camera_aware = camera_aware
        valid = np.flatnonzero(labels >= 0)
        order = valid[np.argsort(labels[valid], kind="stable")]
        self.pids, starts = np.unique(labels[order], return_index=True)
        self.members = np.split(order, starts[1:]) if order.size else []

    def __len__(self) -> int:
        """Indices in one pass (upper bound: singletons give fewer)."""
        return len(self.pids) * self.num_instances

    def _choose(self, rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
        k = self.num_instances - 1
        return rng.choice(candidates, size=k, replace=len(candidates) < self.num_instances)

    def sample_pass(self, rng: np.random.Generator) -> np.ndarray:
        """Indices (into labels) of one pass over every pseudo-id."""
        out: list[np.ndarray] = []
        for kid in rng.permutation(len(self.pids)):
            members = self.members[kid]
            anchor = members[rng.integers(len(members))]
            out.append(np.array([anchor]))
            if self.num_instances == 1:
                continue
            others = members[members != anchor]
            if self.camera_aware:
                other_cams = members[self.camids[members] != self.camids[anchor]]
                if other_cams.size:
                    out.append(self._choose(rng, other_cams))
                    continue
            if others.size:
                out.append(self._choose(rng, others))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def epoch_batches(self, rng: np.random.Generator, batch_size: int, iters: int) -> np.ndarray:
        """int64 [iters, batch_size]: consecutive passes, each cut to whole batches."""
        need = iters * batch_size
        chunks: list[np.ndarray] = []
        total = 0
        while total < need:
            idx = self.sample_pass(rng)
            usable = len(idx) - len(idx) % batch_size
            if usable == 0:
                raise ValueError(
                    f"one pass over {len(self.pids)} pseudo-ids gives {len(idx)} images, fewer than "
                    f"one batch of {batch_size}: lower train.batch_size or get more clusters")
            chunks.append(idx[:usable])
            total += usable
        return np.concatenate(chunks)[:need].reshape(iters, batch_size).astype(np.int64)


class CameraAwareSampler(MultiInstanceSampler):
    """The paper's sampler: other instances preferably from other cameras of the same pseudo-id."""

    def __init__(self, labels: ArrayLike, camids: ArrayLike, num_instances: int) -> None:
        super().__init__(labels, camids, num_instances, camera_aware=True)


class RandomMultiInstanceSampler(MultiInstanceSampler):
    """Camera-agnostic variant: other instances from any other image of the pseudo-id."""

    def __init__(self, labels: ArrayLike, camids: ArrayLike, num_instances: int) -> None:
        super().__init__(labels, camids, num_instances, camera_aware=False)


SAMPLERS = {"camera": CameraAwareSampler, "random": RandomMultiInstanceSampler}


def build_sampler(name: str, labels: ArrayLike, camids: ArrayLike, num_instances: int) -> MultiInstanceSampler:
    """`name`: 'camera' or 'random' (config key train.sampler)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](labels, camids, num_instances)
