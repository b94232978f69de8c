"""Train and test loaders, with an optional decoded-once uint8 image cache.

Two interchangeable paths (flag `use_cache`):
- PIL path: every sample is decoded, bicubic-resized and augmented by PIL in the workers.
- cache path: every image is decoded and bicubic-resized once into a uint8 N×H×W×3 `.npy`
  (memory-mapped; keyed by the record list, the files' sizes/mtimes and the size, so a stale
  cache is rebuilt); workers only gather uint8 rows, and flip / pad-crop / normalise / erasing
  run as batched tensor ops in the main process on `device` (the GPU when it is CUDA).
Both draw a batch's augmentation parameters from (seed, epoch, batch) and give the same tensors.

A global batch k of an epoch is fixed by (seed, epoch) alone; with world_size > 1 each rank
gets rows rank*b:(rank+1)*b of it (b = batch_size / world_size), images and indices alike.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from purireid.data.datasets import DatasetError, Record
from purireid.data.samplers import build_sampler, epoch_rng
from purireid.data.transforms import (
    PAD, AugParams, augment_batch, augment_pil, load_resized, normalise_batch, sample_augmentation,
    to_normalised_tensor,
)
from purireid.io.files import atomic_path, disk_full_error
from purireid.log import get_logger
from purireid.runtime.signals import ignore_stop_signals, stop_signals_blocked

log = get_logger("loaders")

CACHE_VERSION = 1
_CACHE_CHUNK = 256  # rows decoded ahead of the writer


def load_image(data_root: str | Path, record: Record, height: int, width: int) -> Image.Image:
    """`record`'s image decoded and bicubic-resized. One that no longer decodes (truncated,
    replaced or removed since prepare_dataset validated it) raises DatasetError naming the file
    and the fix; the decoder's own message ("Truncated File Read") names neither."""
    path = Path(data_root) / record.path
    try:
        return load_resized(path, height, width)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all three
        raise DatasetError(
            f"image {path} cannot be read ({exc}): it changed after prepare_dataset validated it; fix: rerun "
            "prepare_dataset (snakemake -R prepare_dataset), which decodes every image and names the damaged "
            "ones, then restore those from the dataset's archive (a synthetic dataset: delete its folder)") from exc


# --------------------------------------------------------------------------- image cache
def cache_key(records: Sequence[Record], data_root: str | Path, height: int, width: int) -> str:
    """Hash of the paths, their sizes and mtimes, and the size: any change gives a new cache."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {height}x{width}\n".encode())
    root = Path(data_root)
    for rec in records:
        info = os.stat(root / rec.path)
        digest.update(f"{rec.path}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def build_image_cache(records: Sequence[Record], data_root: str | Path, cache_dir: str | Path,
                      height: int, width: int, *, workers: int = 2, progress: bool = True) -> Path:
    """Path of the uint8 [N, height, width, 3] .npy of the bicubic-resized images (built if absent).

    Written atomically (temporary file renamed into place); concurrent builders are harmless.
    The rows are written in order through a file, never through a memory map of a sparse file
    (where a full disk kills the process with SIGBUS): a full disk, found by a check of the
    free space first or by the write itself, raises purireid.io.files.DiskFullError naming the file.
    """
    from purireid.log import Progress

    path = Path(cache_dir) / f"images-{height}x{width}-{cache_key(records, data_root, height, width)}.npy"
    n = len(records)
    if path.is_file():
        damage = cache_damage(path, (n, height, width, 3))
        if damage is None:
            return path
        # Keyed on the images only, a damaged cache (a kill or a full disk while it was copied,
        # a truncated copy) would fail every run alike: rebuilt in place.
        log.warning("image cache %s is damaged (%s); rebuilding it", path, damage)
    root = Path(data_root)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, height, width, 3)}
    needed = n * height * width * 3 + 4096  # rows + the .npy header
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < needed:
        raise disk_full_error(path, needed)

    def load(i: int) -> np.ndarray:  # PIL releases the GIL while decoding and resizing
        return np.asarray(load_image(root, records[i], height, width), dtype=np.uint8)

    with atomic_path(path) as tmp, open(tmp, "wb") as handle, ThreadPoolExecutor(max(1, workers)) as pool, \
            Progress(n, "caching images", unit="img", enabled=progress) as bar:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, n, _CACHE_CHUNK):  # in order, a bounded number of decoded rows at a time
            rows = list(pool.map(load, range(start, min(n, start + _CACHE_CHUNK))))
            handle.write(np.stack(rows).tobytes())
            bar.update(len(rows))
    return path


def cache_damage(path: str | Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache file `path` cannot hold uint8 rows of `shape` (None when it can): its header
    unreadable or another dtype / shape, or its size not the header's plus the rows'."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"unknown .npy version {version}"
            found, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError) as exc:
        return f"unreadable header: {exc}"
    if tuple(found) != tuple(shape) or dtype != np.uint8 or fortran:
        return f"it holds {dtype} {tuple(found)}, expected uint8 {tuple(shape)}"
    expected = offset + int(np.prod(shape))
    size = os.path.getsize(path)
    return None if size == expected else f"{size} bytes, expected {expected}"


def open_image_cache(path: str | Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


# --------------------------------------------------------------------------- workers
def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; avoid oversubscription
    # SIGTERM/SIGINT to the process group: the main process stops the job and shuts us down.
    ignore_stop_signals()


class _WorkerLoader(DataLoader):
    """A DataLoader whose worker processes leave SIGTERM/SIGINT to the main process: they start
    with the signals blocked and ignore them from their worker_init_fn on."""

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        workers = kwargs.get("num_workers", 0)
        super().__init__(dataset, worker_init_fn=_worker_init if workers else None, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():  # the workers start here
            return super().__iter__()


# --------------------------------------------------------------------------- train loader


class _TrainBatches(Dataset):
    """Item k = rank's slice of global batch k: (images, indices[, params])."""

    def __init__(self, loader: TrainLoader, batches: np.ndarray, epoch: int) -> None:
        self.loader, self.batches, self.epoch = loader, batches, epoch
        self._cache: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        loader = self.loader
        rng = epoch_rng(loader.seed, self.epoch, 1, k)
        params = sample_augmentation(rng, loader.batch_size, loader.height, loader.width, pad=loader.crop_pad)
        b = loader.batch_size // loader.world_size
        rows = slice(loader.rank * b, (loader.rank + 1) * b)
        params = params.take(rows)
        idx = self.batches[k, rows]
        if loader.use_cache:
            if self._cache is None:  # opened lazily: once per worker process
                self._cache = open_image_cache(loader.cache_path)
            # Workers only gather uint8 rows (4x less to ship than float); the main process
            # augments the batch on `device` (the GPU when there is one).
            return torch.from_numpy(self._cache[idx]), torch.from_numpy(idx), params
        root = Path(loader.data_root)
        images = torch.stack([
            augment_pil(load_image(root, loader.records[i], loader.height, loader.width), params, j,
                        pad=loader.crop_pad)
            for j, i in enumerate(idx)])
        return images, torch.from_numpy(idx)


class TrainLoader:
    """Train batches for an epoch: `for images, indices in loader.epoch(epoch, labels): ...`.

    images: float32 [b, 3, height, width] normalised, on `device`; indices: int64 [b] into
    `records` (the train split); b = batch_size / world_size.

    """

    def __init__(self, records: Sequence[Record], data_root: str | Path, *, height: int = 256,
                 width: int = 128, batch_size: int = 256, num_instances: int = 16, iters: int = 200,
                 sampler: str = "camera", workers: int = 0, seed: int = 1, rank: int = 0,
                 world_size: int = 1, use_cache: bool = False, cache_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, crop_pad: int = PAD) -> None:
        """Over 8 parameters on purpose: past the records and their root, each is one config key
        (data.height/width/workers/use_cache, train.batch_size/num_instances/iters/sampler/crop_pad,
        seed) or one fact of the process (rank, world size, device, cache folder, progress bar), all
        keyword-only with the paper's defaults, so a call names what it sets; grouping them would
        only rename the config's sections."""
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if use_cache and cache_dir is None:
            raise ValueError("use_cache=True needs a cache_dir (e.g. results/<dataset>/data/cache)")
        self.records = list(records)
        self.data_root = str(data_root)
        self.height, self.width = height, width
        self.crop_pad = crop_pad  # the pad + random crop augmentation's border, pixels per side
        self.batch_size, self.num_instances, self.iters = batch_size, num_instances, iters
        self.sampler, self.workers, self.seed = sampler, workers, seed
        self.rank, self.world_size = rank, world_size
        self.use_cache = use_cache
        self.device = torch.device(device)
        self.camids = np.array([r.camid for r in self.records], dtype=np.int64)
        self.cache_path: Path | None = None
        if use_cache:
            self.cache_path = build_image_cache(self.records, data_root, cache_dir, height, width,
                                                workers=max(2, workers), progress=progress)

    def __len__(self) -> int:
        return self.iters

    def batch_indices(self, epoch: int, labels: np.ndarray, iters: int | None = None) -> np.ndarray:
        """The epoch's global batches, int64 [iters, batch_size] (all ranks)."""
        labels = np.asarray(labels)
        if len(labels) != len(self.records):
            raise ValueError(f"{len(labels)} labels for {len(self.records)} train records")
        sampler = build_sampler(self.sampler, labels, self.camids, self.num_instances)
        return sampler.epoch_batches(epoch_rng(self.seed, epoch, 0), self.batch_size, iters or self.iters)

    def epoch(self, epoch: int, labels: np.ndarray, iters: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly `iters` (default self.iters) batches; labels: pseudo label per record, -1 = outlier."""
        batches = self.batch_indices(epoch, labels, iters)
        cuda = self.device.type == "cuda"
        dataset = _TrainBatches(self, batches, epoch)
        loader = _WorkerLoader(dataset, batch_size=None, shuffle=False, num_workers=self.workers,
                               pin_memory=cuda, collate_fn=_identity_collate)
        for item in loader:
            if self.use_cache:
                images, idx, params = item
                yield augment_batch(images.to(self.device, non_blocking=True), params, pad=self.crop_pad), idx
            else:
                images, idx = item
                yield images.to(self.device, non_blocking=True), idx


def _identity_collate(item):
    return item  # items are whole batches already; keep AugParams as numpy


# --------------------------------------------------------------------------- test loader
class _TestBatches(Dataset):
    def __init__(self, records: Sequence[Record], data_root: str, height: int, width: int,
                 batch_size: int, cache_path: Path | None) -> None:
        self.records, self.data_root = records, data_root
        self.height, self.width, self.batch_size = height, width, batch_size
        self.cache_path = cache_path
        self._cache: np.ndarray | None = None

    def __len__(self) -> int:
        return (len(self.records) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, k: int):
        lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, len(self.records))
        idx = torch.arange(lo, hi, dtype=torch.int64)
        if self.cache_path is not None:
            if self._cache is None:
                self._cache = open_image_cache(self.cache_path)
            return normalise_batch(torch.from_numpy(np.array(self._cache[lo:hi]))), idx
        root = Path(self.data_root)
        return torch.stack([to_normalised_tensor(load_image(root, r, self.height, self.width))
                            for r in self.records[lo:hi]]), idx


def build_test_loader(records: Sequence[Record], data_root: str | Path, *, height: int = 256,
                      width: int = 128, batch_size: int = 256, workers: int = 0,
                      use_cache: bool = False, cache_dir: str | Path | None = None,
                      pin_memory: bool = False) -> DataLoader:
    """Yields (images float32 [b, 3, H, W], indices int64 [b]) over `records` in order.

    Over 8 parameters on purpose: the records and their root, then keyword-only config keys
    (data.height, data.width, data.workers, data.use_cache, evaluate's batch size) and the process's
    cache folder and pinning, each named at the call."""
    records = list(records)
    cache_path = None
    if use_cache:
        if cache_dir is None:
            raise ValueError("use_cache=True needs a cache_dir")
        cache_path = build_image_cache(records, data_root, cache_dir, height, width, workers=max(2, workers),
                                       progress=False)
    dataset = _TestBatches(records, str(data_root), height, width, batch_size, cache_path)
    return _WorkerLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory)


__all__ = ["AugParams", "TrainLoader", "build_image_cache", "build_test_loader", "cache_key", "load_image",
           "cache_damage", "open_image_cache"]
