"""Benchmark: one epoch's pseudo-labelling (three 2048-d views, fused, DBSCAN).

    .venv/bin/python benchmarks/bench_pseudo_labels.py            # N = 12936 and 32621
    .venv/bin/python benchmarks/bench_pseudo_labels.py --n 12936 --compare-dense

Each N runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own. The features
are clustered like re-ID features: ~N/16 identities whose centres mix a shared low-rank part
with an identity-specific part, plus camera offsets and per-image noise, L2-normalised.
--compare-dense also densifies each view's full (unpruned) Jaccard matrix, fuses them as
dense float32 arrays and checks that scikit-learn's DBSCAN on that gives identical labels
(needs several GB): this checks the eps-pruning and the sparse fusion.
The Jaccard values themselves are checked against the dense loop reference
(tests/jaccard_reference.py, too slow at this N) by tests/test_cluster.py.

The CPU is shared: each line reports wall seconds, the process CPU seconds and the 1-minute
load average. `--threads 1` (or OMP_WAIT_POLICY=PASSIVE) is faster when the cores are busy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SIZES = {"market1501": 12936, "msmt17": 32621}


def make_views(n: int, dim: int = 2048, seed: int = 0, ids_per: int = 16, block: int = 1024) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ids = max(1, n // ids_per)
    pid = rng.integers(0, n_ids, n)
    cam = rng.integers(0, 6, n)
    views = []
    for _ in range(3):
        basis = rng.standard_normal((64, dim), dtype=np.float32) / np.sqrt(dim)
        centres = rng.standard_normal((n_ids, 64), dtype=np.float32) @ basis
        centres += 0.7 * rng.standard_normal((n_ids, dim), dtype=np.float32) / np.sqrt(dim)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        camoff = rng.standard_normal((6, dim), dtype=np.float32) / np.sqrt(dim)
        # Row blocks (same random stream, same values as one big draw): no N x dim float64
        # temporaries, so the harness's own peak stays near the size of the three views.
        x = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, block):
            e = min(n, s + block)
            xb = centres[pid[s:e]] + 0.35 * camoff[cam[s:e]]
            xb += 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
            x[s:e] = xb
        views.append(x)
    return views


def run_one(n: int, compare_dense: bool, eps: float) -> dict:
    import torch

    from purireid import cluster

    views = make_views(n)
    timings: dict = {}
    t, c = time.perf_counter(), time.process_time()
    labels = cluster.pseudo_labels(views, eps=eps, timings=timings)
    total, cpu = time.perf_counter() - t, time.process_time() - c
    fallback = cluster._exact_lists.last_fallback_rows
    res = {
        "n": n,
        "seconds": round(total, 2),
        "cpu_s": round(cpu, 2),  # all threads: with a shared CPU, wall time depends on the load
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "knn_s": round(timings["knn"], 2),
        "jaccard_s": round(timings["jaccard"], 2),
        "fuse_dbscan_s": round(timings["fuse_dbscan"], 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "clusters": int(labels.max() + 1),
        "outliers": int((labels < 0).sum()),
        "torch_threads": torch.get_num_threads(),
        "uncertified_rows_last_view": int(fallback),
    }
    if compare_dense:
        from sklearn.cluster import DBSCAN

        mats = [cluster.jaccard_distance(v) for v in views]
        dg, du, dl = (_densify(m) for m in mats)
        dense = (1 - 2 * 0.15) * dg + 0.15 * du + 0.15 * dl  # SPEC §3.3 on dense float32 arrays
        del dg, du, dl, mats
        ref = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
        res["labels_equal_dense_dbscan"] = bool(np.array_equal(ref, labels))
    return res


def _densify(m) -> np.ndarray:
    d = np.ones(m.shape, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    d[rows, m.indices] = m.data
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=list(SIZES.values()))
    ap.add_argument("--eps", type=float, default=0.6)
    ap.add_argument("--compare-dense", action="store_true", help="also check labels against dense DBSCAN")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads in the children (0: default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        # Before torch/faiss start OpenMP; on a shared, busy CPU one thread can beat two.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        print(json.dumps(run_one(args.n[0], args.compare_dense, args.eps)))
        return
    import faiss
    import torch

    print(f"# cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} faiss_omp={faiss.omp_get_max_threads()} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    for n in args.n:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--eps", str(args.eps)]
        if args.compare_dense:
            cmd.append("--compare-dense")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        line = (
            f"N={r['n']:>6}  total {r['seconds']:6.2f} s  [CPU {r['cpu_s']:.1f} s, load {r['loadavg_1min']:.2f}]  (kNN {r['knn_s']:.2f} s, Jaccard {r['jaccard_s']:.2f} s, "
            f"fusion+DBSCAN {r['fuse_dbscan_s']:.2f} s)  peak RSS {r['peak_rss_gb']:.2f} GB  "
            f"clusters {r['clusters']}  outliers {r['outliers']}  uncertified rows {r['uncertified_rows_last_view']}"
        )
        if "labels_equal_dense_dbscan" in r:
            line += f"  labels == dense DBSCAN: {r['labels_equal_dense_dbscan']}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
