"""Market-1501 protocol metrics (docs/method.md): mAP, mINP and CMC against hand-made cases, the brute-force
definition and a scikit-learn per-query loop (tests/evaluation_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluation_reference import brute_force, sklearn_reference

import purireid.evaluation.metrics as ev
from purireid.evaluation.metrics import evaluate_features, evaluate_rank, headline_metrics


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Run every metric test through both counting paths of _match_ranks."""
    monkeypatch.setattr(ev, "_SPARSE_FRACTION", 2.0 if request.param == "sparse" else -1.0)
    return request.param


def random_case(rng, nq, ng, nids, ncams, dim=8, junk=True):
    qp = rng.integers(0 if not junk else 1, nids, nq)
    gp = rng.integers(-1 if junk else 0, nids, ng)
    qc = rng.integers(0, ncams, nq)
    gc = rng.integers(0, ncams, ng)
    qf = rng.standard_normal((nq, dim)).astype(np.float32)
    gf = rng.standard_normal((ng, dim)).astype(np.float32)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    return qf, gf, qp, gp, qc, gc


def sq_dist(qf, gf):
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    return (q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None] - 2 * q @ g.T).numpy()


def test_hand_made_case(path):
    # gallery: 0 pid1/cam0 (same pid+cam as query 0: removed), 1 pid2/cam1, 2 pid1/cam1,
    #          3 pid0/cam0 (distractor: kept), 4 pid1/cam2, 5 junk
    gp = np.array([1, 2, 1, 0, 1, -1])
    gc = np.array([0, 1, 1, 0, 2, 0])
    qp = np.array([1, 3, 2])
    qc = np.array([0, 0, 0])
    d = np.array(
        [
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.05],  # valid order: 1(-) 2(+) 3(-) 4(+): AP (1/2+2/4)/2
            [0.3, 0.2, 0.1, 0.0, 0.5, 0.6],  # pid 3: no true match -> left out
            [0.5, 0.6, 0.1, 0.2, 0.3, 0.0],  # valid order: 2 3 4 0 1(+): AP 1/5
        ],
        dtype=np.float32,
    )
    res = evaluate_rank(d, qp, gp, qc, gc, max_rank=6)
    assert res["num_valid_queries"] == 2
    assert res["mAP"] == pytest.approx((0.5 + 0.2) / 2, abs=1e-12)
    # INP = matches / rank of the last match: query 0 2/4, query 2 1/5
    assert res["mINP"] == pytest.approx((2 / 4 + 1 / 5) / 2, abs=1e-12)
    np.testing.assert_allclose(res["cmc"], [0, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert res["cmc"].shape == (6,)
    bf = brute_force(d, qp, gp, qc, gc, max_rank=6)
    assert res["mAP"] == pytest.approx(bf["mAP"], abs=1e-12)
    assert res["mINP"] == pytest.approx(bf["mINP"], abs=1e-12)
    np.testing.assert_allclose(res["cmc"], bf["cmc"])


@pytest.mark.parametrize(
    ("labels", "inp"),
    [
        # + = true match, - = false match, in rank order; NP = (R_hard - matches) / R_hard
        ("++--", 1.0),          # every match first: nothing to wade through
        ("-+", 1 / 2),          # hardest match at rank 2, 1 match
        ("+--+", 2 / 4),        # R_hard 4, 2 matches
        ("---+-+", 2 / 6),
        ("+++---+", 4 / 7),
        ("-----+", 1 / 6),
    ],
)
def test_minp_hand_made(path, labels, inp):
    """One query per case, gallery in rank order (distances 0, 1, 2, ...): INP = 1 - NP."""
    gp = np.array([1 if c == "+" else 2 for c in labels])
    d = np.arange(len(labels), dtype=np.float32)[None, :]
    res = evaluate_rank(d, [1], gp, [0], np.ones(len(labels), dtype=int), max_rank=len(labels))
    assert res["mINP"] == pytest.approx(inp, abs=1e-12)
    assert res["mINP"] == pytest.approx(brute_force(d, [1], gp, [0], np.ones(len(labels)))["mINP"], abs=1e-12)


def test_minp_ignores_removed_items_and_averages_queries(path):
    # gallery: 0 pid1/cam0 (same pid+cam as the query: removed), 1 junk (removed),
    #          2 pid2 (false), 3 pid1/cam1 (match), 4 pid0 distractor (false), 5 pid1/cam2 (match)
    gp = np.array([1, -1, 2, 1, 0, 1])
    gc = np.array([0, 1, 1, 1, 1, 2])
    d = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                  [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]], dtype=np.float32)
    # query 0 (pid 1, cam 0): valid order 2(-) 3(+) 4(-) 5(+) -> INP 2/4
    # query 1 (pid 2, cam 0): valid order 5 4 3 2(+)           -> INP 1/4
    res = evaluate_rank(d, [1, 2], gp, [0, 0], gc, max_rank=4)
    assert res["mINP"] == pytest.approx((2 / 4 + 1 / 4) / 2, abs=1e-12)


def test_same_camera_match_only_is_not_a_match(path):
    # The only same-pid item is in the query's camera: removed, so no valid match at all.
    d = np.array([[0.1, 0.2], [0.2, 0.1]], dtype=np.float32)
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(d[:1], [5], [5, 7], [2], [2, 0])
    # Gallery 2 (pid 5, the query's camera 2) is removed although it is the closest
    # same-pid item; gallery 0 (pid 5, camera 1) is the match; the distractor (pid 0)
    # stays and ranks before it: valid order 1, 0 -> AP 1/2.
    d = np.array([[0.3, 0.1, 0.05]], dtype=np.float32)
    res = evaluate_rank(d, [5], [5, 0, 5], [2], [1, 0, 2])
    assert res["mAP"] == pytest.approx(1 / 2)
    assert res["cmc"][0] == 0 and res["cmc"][1] == 1


def test_ties_follow_gallery_index(path):
    gp = np.array([2, 1, 3, 1])
    gc = np.array([1, 1, 1, 1])
    d = np.ones((1, 4), dtype=np.float32)
    res = evaluate_rank(d, [1], gp, [0], gc, max_rank=4)
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1])
    # -0.0 ties with +0.0; negative distances (rounding) rank first.
    d = np.array([[0.0, -0.0, -1e-7, 0.0]], dtype=np.float32)
    res = evaluate_rank(d, [1], [3, 1, 2, 1], [0], [1, 1, 1, 1], max_rank=4)
    # order: 2 (-1e-7), 0, 1 (+), 3 (+): matches at ranks 3 and 4
    assert res["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_many_ties(path, seed):
    rng = np.random.default_rng(seed)
    nq, ng = 25, 60
    qp = rng.integers(1, 6, nq)
    gp = rng.integers(-1, 6, ng)
    qc = rng.integers(0, 3, nq)
    gc = rng.integers(0, 3, ng)
    d = rng.integers(0, 4, (nq, ng)).astype(np.float32)  # heavy ties
    res = evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    bf = brute_force(d, qp, gp, qc, gc, max_rank=10)
    assert res["num_valid_queries"] == bf["num_valid_queries"]
    assert res["mAP"] == pytest.approx(bf["mAP"], abs=1e-12)
    assert res["mINP"] == pytest.approx(bf["mINP"], abs=1e-12)
    np.testing.assert_allclose(res["cmc"], bf["cmc"], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_sklearn_loop_on_random_data(path, seed):
    rng = np.random.default_rng(seed)
    qf, gf, qp, gp, qc, gc = random_case(rng, 120, 700, 40, 4)
    d = sq_dist(qf, gf)
    res = evaluate_rank(d, qp, gp, qc, gc)
    ref = sklearn_reference(d, qp, gp, qc, gc)
    assert res["num_valid_queries"] == ref["num_valid_queries"]
    assert abs(res["mAP"] - ref["mAP"]) <= 1e-9
    assert abs(res["mINP"] - ref["mINP"]) <= 1e-12
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    assert res["cmc"].dtype == np.float64 and res["cmc"].shape == (50,)
    # torch input gives the same.
    res_t = evaluate_rank(torch.from_numpy(d), qp, gp, qc, gc)
    assert res_t["mAP"] == res["mAP"]


def test_chunked_equals_unchunked_and_rank(path):
    rng = np.random.default_rng(3)
    qf, gf, qp, gp, qc, gc = random_case(rng, 53, 211, 12, 3)
    full = evaluate_rank(sq_dist(qf, gf), qp, gp, qc, gc, max_rank=20)
    for chunk in (1, 7, 53, 1000, None):
        res = evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=20, chunk_size=chunk)
        assert res["mAP"] == pytest.approx(full["mAP"], abs=1e-12)
        assert res["mINP"] == pytest.approx(full["mINP"], abs=1e-12)
        np.testing.assert_array_equal(res["cmc"], full["cmc"])
        assert res["num_valid_queries"] == full["num_valid_queries"]
        assert "topk_indices" not in res
    res = evaluate_features(torch.from_numpy(qf), torch.from_numpy(gf), qp, gp, qc, gc, max_rank=20)
    assert res["mAP"] == pytest.approx(full["mAP"], abs=1e-12)


def test_topk_indices(path):
    rng = np.random.default_rng(4)
    qf, gf, qp, gp, qc, gc = random_case(rng, 9, 30, 4, 2)
    d = sq_dist(qf, gf)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, chunk_size=4, topk=5)
    idx = res["topk_indices"]
    assert idx.shape == (9, 5) and idx.dtype == np.int64
    for i in range(9):
        ranked = sorted(range(30), key=lambda j: (float(d[i, j]), j))
        ranked = [j for j in ranked if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])]
        assert list(idx[i]) == ranked[:5]
    # The same lists from the distance matrix.
    np.testing.assert_array_equal(evaluate_rank(d, qp, gp, qc, gc, topk=5)["topk_indices"], idx)
    # -1 pads past the valid items: gallery 0 (same pid and camera) and 2 (junk) are skipped.
    short = evaluate_rank(np.array([[0.1, 0.2, 0.0, 0.3]], dtype=np.float32), [1], [1, 1, -1, 2], [0], [0, 1, 0, 0],
                          topk=4)["topk_indices"]
    assert short.tolist() == [[1, 3, -1, -1]]


def test_headline_metrics():
    res = {"mAP": 0.5, "mINP": 0.25, "cmc": np.linspace(0.1, 1.0, 10), "num_valid_queries": 3}
    assert headline_metrics(res) == pytest.approx({"mAP": 0.5, "mINP": 0.25, "rank1": 0.1, "rank5": 0.5,
                                                   "rank10": 1.0})
    # A CMC shorter than a headline rank (evaluate.max_rank 3): that rank is unknown, not the last value.
    assert headline_metrics({**res, "cmc": res["cmc"][:3]})["rank5"] is None


def test_errors():
    d = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="queries"):
        evaluate_rank(d, [1], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="gallery"):
        evaluate_rank(d, [1, 2], [1, 2], [0, 0], [1, 1, 1])
    d[0, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(np.zeros((1, 2), dtype=np.float32), [4], [1, 2], [0], [1, 1])


def test_rerank_path():
    from purireid.labels.jaccard import rerank_distance

    rng = np.random.default_rng(5)
    qf, gf, qp, gp, qc, gc = random_case(rng, 20, 80, 6, 3, dim=16, junk=False)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True, chunk_size=7, topk=3)
    ref = evaluate_rank(rerank_distance(qf, gf), qp, gp, qc, gc)
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    np.testing.assert_array_equal(res["cmc"], ref["cmc"])
    assert res["topk_indices"].shape == (20, 3)
