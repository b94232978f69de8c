"""Label sources (purireid.labels.sources) and the trainer's labelling step built on them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from purireid import VIEWS
from purireid.runtime.distributed import DistContext
from purireid.labels.sources import DegenerateClustering, DegenerateLabels, TrueLabels, check_clusters, count_classes
from purireid.training.loop import label_epoch
from purireid.training.terms import build_terms
from purireid.training.terms.camera_proxy import CameraProxyTerm
from purireid.training.terms.memory import MemoryTerm


def test_true_labels_are_relabelled_and_fixed():
    source = TrueLabels([7, 3, 7, -1, 3, 9], batch_size=8, num_instances=4)
    features = {v: torch.zeros(6, 2) for v in VIEWS}
    labels = source.assign(features, epoch=0)
    assert labels.tolist() == [1, 0, 1, -1, 0, 2]
    assert source.assign(features, epoch=5).tolist() == labels.tolist()
    assert source.check(labels, epoch=0) == 3
    with pytest.raises(DegenerateLabels, match="train.batch_size=16"):
        TrueLabels([7, 3, 7, -1, 3, 9], batch_size=16, num_instances=4).check(labels, epoch=0)
    with pytest.raises(ValueError, match="6 true labels for 4 train records"):
        source.assign({v: torch.zeros(4, 2) for v in VIEWS}, epoch=0)
    assert source.fingerprint() != TrueLabels([7, 3, 9, -1, 3, 9], batch_size=8, num_instances=4).fingerprint()


def test_label_epoch_gives_the_terms_their_memories_from_the_sources_labels_and_features():
    rng = np.random.default_rng(0)
    features = {v: torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32)),
                                                 dim=1) for v in VIEWS}
    source = TrueLabels([5, 5, 8, 8, 8, -1], batch_size=4, num_instances=2, features=features)
    records = [SimpleNamespace(camid=c) for c in (0, 1, 2, 2, 0, 1)]
    config = {"train": {"temperature": 0.05, "camera_proxy": 0.0, "num_instances": 2}}
    labelling = label_epoch(None, source, records, config, DistContext(), epoch=0)
    targets = labelling.targets(memory_momentum=1.0)
    assert targets.labels.tolist() == [0, 0, 1, 1, 1, -1] and targets.num_classes == 2
    assert [t.name for t in build_terms(config)] == ["ce"]  # the camera proxies are off
    memory = MemoryTerm.from_config(config)
    memory.start_epoch(targets)
    for v in VIEWS:
        centres = torch.stack([features[v][:2].mean(0), features[v][2:5].mean(0)])
        expected = torch.nn.functional.normalize(centres, dim=1)
        assert torch.allclose(memory.memories[v].memory, expected, atol=1e-6), v
        assert memory.memories[v].momentum == 1.0

    # train.camera_proxy > 0: a proxy per (class, camera), from those images' features
    config = {"train": {"temperature": 0.05, "camera_proxy": 0.5, "num_instances": 2}}
    targets = label_epoch(None, source, records, config, DistContext(), epoch=0).targets(memory_momentum=0.5)
    assert [t.name for t in build_terms(config)] == ["ce", "camproxy"]
    proxies = CameraProxyTerm.from_config(config)
    proxies.start_epoch(targets)
    assert proxies.proxy_labels.tolist() == [0, 1, 3, 3, 2, -1]  # (0,0) (0,1) (1,0) (1,2)
    for v in VIEWS:
        f = features[v]
        expected = torch.nn.functional.normalize(torch.stack([f[0], f[1], f[4], (f[2] + f[3]) / 2]), dim=1)
        assert torch.allclose(proxies.proxies[v].proxies.memory, expected, atol=1e-6), v
        assert proxies.proxies[v].proxy_classes.tolist() == [0, 0, 1, 1]
        assert proxies.proxies[v].proxies.momentum == 0.5


def test_cluster_check_is_a_degenerate_labels_error():
    config = {"train": {"batch_size": 8, "num_instances": 4}, "cluster": {"eps": 0.6}}
    assert issubclass(DegenerateClustering, DegenerateLabels)
    assert count_classes(np.array([-1, -1])) == 0 and count_classes(np.array([0, 2, -1])) == 3
    assert check_clusters(np.array([0, 1, -1]), config, epoch=0) == 2


def test_the_schema_offers_exactly_the_registered_pseudo_label_methods():
    from purireid.config.resolve import load_schema
    from purireid.labels.sources import LABEL_SOURCES, PSEUDO_LABEL_METHODS, label_source

    from purireid.labels.methods import METHOD_NAMES

    # The schema's choices are the light list's names, and every one of them has a LabelSource.
    assert load_schema()["properties"]["cluster"]["properties"]["method"]["enum"] == list(METHOD_NAMES) \
        == list(PSEUDO_LABEL_METHODS)
    assert set(PSEUDO_LABEL_METHODS) < set(LABEL_SOURCES)
    with pytest.raises(ValueError, match="unknown label source 'kmeans'.*multiview_dbscan"):
        label_source("kmeans", {}, [])


def test_config_checks_belong_to_the_chosen_method(monkeypatch):
    """DBSCAN's eps check is multiview_dbscan's: resolve_config runs the checks of the configured
    cluster.method (through the light registry), and another method is not held to it."""
    import purireid.labels.methods as methods
    from purireid.config.resolve import ConfigError, resolve_config

    too_wide = resolve_config({"cluster": {"eps": 0.6}})
    too_wide["cluster"]["eps"] = 0.9999999999
    assert "cluster.eps" in methods.config_problems(too_wide)[0]
    monkeypatch.setitem(methods.CONFIG_CHECKS, "other_method", lambda config: [])
    assert methods.config_problems({**too_wide, "cluster": {**too_wide["cluster"], "method": "other_method"}}) == []
    monkeypatch.setitem(methods.CONFIG_CHECKS, "multiview_dbscan",
                        lambda config: ["config key 'cluster.k1' (30) is the method's own complaint"])
    with pytest.raises(ConfigError, match="the method's own complaint"):
        resolve_config({})


def test_the_registries_the_schema_reads_are_torch_free():
    """The config check runs when Snakemake parses the workflow: the backbone and pseudo-label method
    names (the schema's choices) and the methods' checks load without torch."""
    import subprocess
    import sys

    code = ("import sys; from purireid.config.resolve import load_schema, resolve_config; resolve_config({}); "
            "s = load_schema()['properties']; print(s['model']['properties']['arch']['enum'], "
            "s['cluster']['properties']['method']['enum'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False" and "resnet50_ibn_a" in out and "multiview_dbscan" in out
