"""Data layer: dataset registry, manifest, archive extraction and image validation, synthetic
generator, transforms, samplers, loaders (the prepare stage itself is purireid.stages.prepare_dataset)."""

from purireid.data.datasets import (
    DATASET_INFO, DATASETS, SPLITS, DatasetError, Record, dataset_folder, load_dataset,
    read_manifest, write_manifest,
)
from purireid.data.loaders import TrainLoader, build_image_cache, build_test_loader
from purireid.data.prepare import extract_archive, validate_images
from purireid.data.samplers import (
    CameraAwareSampler, MultiInstanceSampler, RandomMultiInstanceSampler, build_sampler,
)
from purireid.data.synthetic import generate_synthetic
from purireid.data.transforms import TestTransform, TrainTransform

__all__ = [
    "DATASET_INFO", "DATASETS", "SPLITS", "CameraAwareSampler", "DatasetError",
    "MultiInstanceSampler", "RandomMultiInstanceSampler", "Record", "TestTransform", "TrainLoader",
    "TrainTransform", "build_image_cache", "build_sampler", "build_test_loader", "dataset_folder",
    "extract_archive", "generate_synthetic", "load_dataset", "read_manifest", "validate_images",
    "write_manifest",
]

