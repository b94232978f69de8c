"""The dataset registry: one entry per `dataset` value, everything the rest of purireid needs to
know of a dataset kind before reading it.

Adding a dataset is one `DatasetKind` entry in `DATASET_KINDS` (and, for a new on-disk layout, one
loader in purireid.data.datasets.LAYOUTS): the config schema's `dataset` choices are this
registry's keys, `source.dataset`'s those whose train split names its identities
(purireid.config.schema), the prepare stage reads its folder, archive and published counts, and
the workflow asks `has_labelled_split` whether the evaluate and summary rules exist.

Plain data and file-system checks, no torch import: the config check, which runs when Snakemake
parses the workflow, reads the names without paying for torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DATASET_KINDS", "DatasetKind", "has_labelled_split", "kind_folder", "labelled_source_names"]


@dataclass(frozen=True)
class DatasetKind:
    """A dataset kind.

    folder: where it lives relative to data_root ("" = the folder `prepare.folder_name` names);
    layout: the loader of purireid.data.datasets.LAYOUTS that lists its images; archive: the
    original archive's file name; counts: published image counts (gallery without junk);
    hint: where it comes from (messages); train_identities: its train file names carry person
    ids (False: no identity is ever read, and what needs them is refused); labelled_split:
    True = it always has a labelled query/gallery split, None = when its folder holds
    `query/` and `gallery/` (`has_labelled_split`).
    """

    folder: str
    layout: str
    archive: str | None = None
    counts: Mapping[str, int] | None = None
    hint: str = ""
    train_identities: bool = True
    labelled_split: bool | None = True


DATASET_KINDS: dict[str, DatasetKind] = {
    "synthetic": DatasetKind("synthetic/Synthetic-ReID", "market", hint="purireid's generator"),
    "market1501": DatasetKind(
        "market1501/Market-1501-v15.09.15", "market", "Market-1501-v15.09.15.zip",
        {"train": 12936, "query": 3368, "gallery": 15913}, "Market-1501 (Zheng et al., ICCV 2015)"),
    "msmt17": DatasetKind(
        "msmt17/MSMT17_V1", "msmt17", "MSMT17_V1.tar.gz",
        {"train": 32621, "query": 11659, "gallery": 82161},
        "MSMT17 (Wei et al., CVPR 2018; obtained from its authors on request)"),
    "dukemtmcreid": DatasetKind(
        "dukemtmc/DukeMTMC-reID", "market", "DukeMTMC-reID.zip",
        {"train": 16522, "query": 2228, "gallery": 17661}, "DukeMTMC-reID (Zheng et al., ICCV 2017)"),
    "folder": DatasetKind("", "market", hint="your own data in the Market-1501 layout"),
    "crops": DatasetKind("", "crops", hint="your own unlabelled person crops (train/<camera>/ or train.csv)",
                         train_identities=False, labelled_split=None),
}

# What each folder-named kind expects inside its folder (the message when prepare.folder_name is unset).
FOLDER_CONTENTS = {
    "market": "bounding_box_train/, query/ and bounding_box_test/",
    "crops": "train/ (or train.csv) and optionally query/ and gallery/",
}


def labelled_source_names() -> list[str]:
    """The kinds a supervised source pretraining can use: those whose train split has identities."""
    return [name for name, kind in DATASET_KINDS.items() if kind.train_identities]


def kind_folder(name: str, data_root: str | Path, folder_name: str | None = None) -> Path:
    """The folder of dataset `name` under data_root. Raises ValueError naming the key to set."""
    if name not in DATASET_KINDS:
        raise ValueError(f"unknown dataset '{name}'; expected one of {sorted(DATASET_KINDS)}")
    kind = DATASET_KINDS[name]
    if kind.folder:
        return Path(data_root) / kind.folder
    if not folder_name:
        raise ValueError(
            f"dataset '{name}' needs a folder name: set config key 'prepare.folder_name' to the "
            f"sub-folder of data_root that holds {FOLDER_CONTENTS[kind.layout]}")
    return Path(data_root) / folder_name


def has_labelled_split(config: Mapping[str, Any]) -> bool:
    """Whether the configured dataset has a labelled query/gallery split to evaluate on.

    Decided when the workflow is parsed: by the registry, or for a kind that may lack one
    (`labelled_split` None, i.e. crops) by whether its folder holds both `query/` and `gallery/`
    (an absent folder counts as none: prepare then names what is missing).
    """
    kind = DATASET_KINDS[config["dataset"]]
    if kind.labelled_split is not None:
        return kind.labelled_split
    try:
        base = kind_folder(config["dataset"], config["data_root"], config["prepare"]["folder_name"])
    except ValueError:
        return False
    return (base / "query").is_dir() and (base / "gallery").is_dir()
