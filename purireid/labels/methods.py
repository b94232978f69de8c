"""The pseudo-label methods by name: the one list of `cluster.method`'s choices, and each
method's own checks of the config.

Light (no torch): the config schema reads the names and `resolve_config` runs the
checks when Snakemake parses the workflow. purireid.labels.sources registers a LabelSource
class under each of these names. A new method is an entry here (its name and its config
check) and its LabelSource class in that registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["CONFIG_CHECKS", "METHOD_NAMES", "config_problems", "multiview_dbscan_problems"]


def multiview_dbscan_problems(config: Mapping[str, Any]) -> list[str]:
    """What multiview_dbscan cannot work with: DBSCAN's eps at or above the fused distance of two
    unrelated images. Pairs that are no neighbours in any view have fused distance
    (1 - 2 l1) + l1 + l1, summed in float32 as the clustering does; with eps at or above it
    every image is every other's neighbour and the sparse distance matrix is meaningless."""
    cluster = config["cluster"]
    lambda1 = cluster["lambda1"]
    unrelated = np.float32(1 - 2 * lambda1) + np.float32(lambda1) + np.float32(lambda1)
    if cluster["eps"] >= unrelated:
        return [f"config key 'cluster.eps' ({cluster['eps']}) must be below {float(unrelated):g}, the fused Jaccard "
                "distance of two unrelated images (the paper uses 0.6 for Market-1501, 0.7 for MSMT17)"]
    return []


#: Each method's checks of a resolved config: the problems found, each a sentence naming the key.
CONFIG_CHECKS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "multiview_dbscan": multiview_dbscan_problems,
}

METHOD_NAMES: tuple[str, ...] = tuple(CONFIG_CHECKS)


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """The problems the config's `cluster.method` finds with it (none for an unknown method:
    the schema refuses that one by name)."""
    check = CONFIG_CHECKS.get(config["cluster"]["method"])
    return check(config) if check else []
