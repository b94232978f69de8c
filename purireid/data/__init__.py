"""Data layer: dataset registry, prepare stage, synthetic generator, transforms, samplers, loaders."""

from purireid.data.datasets import (
    DATASET_INFO, DATASETS, SPLITS, DatasetError, Record, dataset_folder, load_dataset,
    read_manifest, write_manifest,
)
from purireid.data.loaders import TrainLoader, build_image_cache, build_test_loader
from purireid.data.samplers import (
    CameraAwareSampler, MultiInstanceSampler, RandomMultiInstanceSampler, build_sampler,
)
from purireid.data.synthetic import generate_synthetic
from purireid.data.transforms import TestTransform, TrainTransform

__all__ = [
    "DATASET_INFO", "DATASETS", "SPLITS", "CameraAwareSampler", "DatasetError",
    "MultiInstanceSampler", "RandomMultiInstanceSampler", "Record", "TestTransform", "TrainLoader",
    "TrainTransform", "build_image_cache", "build_sampler", "build_test_loader", "dataset_folder",
    "extract_archive", "generate_synthetic", "load_dataset", "prepare_dataset", "read_manifest",
    "write_manifest",
]


def __getattr__(name: str):
    # Imported lazily so `python -m purireid.data.prepare` does not import the module twice.
    if name in ("prepare_dataset", "extract_archive"):
        from purireid.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'purireid.data' has no attribute '{name}'")
