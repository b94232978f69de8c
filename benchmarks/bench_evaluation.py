"""Benchmark of purireid.evaluation.metrics at Market-1501 and MSMT17 sizes.

Random L2-normalised 2048-d features, in two flavours:
  random     i.i.d. Gaussian directions: mAP ~0, true matches anywhere in the ranking
             (the worst case for purireid.evaluation.metrics, which only looks closely at the
             items ranked before a query's last true match)
  clustered  image = its identity's centre + noise: mAP ~0.9, like a trained model
Every measurement runs in a fresh subprocess so that its memory figures are its own; RSS is sampled every
5 ms during the timed call ("inputs" = RSS just before it).

    .venv/bin/python benchmarks/bench_evaluation.py            # market + msmt17
    .venv/bin/python benchmarks/bench_evaluation.py --sizes market

Cases:
  rank       evaluate_rank on a precomputed float32 distance matrix (the metric only)
  reference  per-query loop: argsort + scikit-learn's average_precision_score, as the
             released code does (Market size only; tests/evaluation_reference.py, shared
             with tests/test_evaluation.py)
  features   evaluate_features from the features (chunked matmul + metric, topk=10)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

from pathlib import Path

import numpy as np

SIZES = {
    # name: (num_query, num_gallery, num_test_ids, num_cams)
    "market": (3368, 15913, 750, 6),
    "msmt17": (11659, 82161, 3060, 15),
}
DIM = 2048


def make_data(name: str, mode: str = "random", seed: int = 0):
    nq, ng, nids, ncams = SIZES[name]
    rng = np.random.default_rng(seed)
    # Gallery pids 0..nids (0 = distractors), queries only real ids.
    qp = rng.integers(1, nids + 1, nq)
    gp = np.concatenate([rng.permutation(np.arange(1, nids + 1)), rng.integers(0, nids + 1, ng - nids)])
    qc = rng.integers(0, ncams, nq)
    gc = rng.integers(0, ncams, ng)
    centres = rng.standard_normal((nids + 1, DIM), dtype=np.float32)

    def feats(pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), DIM), dtype=np.float32)
        for s in range(0, len(pids), 8192):  # bounded temporaries
            x = rng.standard_normal((len(pids[s : s + 8192]), DIM), dtype=np.float32)
            if mode == "clustered":
                x = centres[pids[s : s + 8192]] + 3.0 * x
            out[s : s + 8192] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return feats(qp), feats(gp), qp, gp, qc, gc


def distmat(qf: np.ndarray, gf: np.ndarray) -> np.ndarray:
    import torch

    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    d = torch.addmm((g * g).sum(1)[None, :], q, g.T, alpha=-2.0)
    return d.add_((q * q).sum(1, keepdim=True)).numpy()


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class RssSampler:
    """Highest resident set size seen (every 5 ms) while the block runs."""

    def __enter__(self):
        self.peak = current_rss_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_gb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_gb())


def run_case(size: str, case: str, mode: str) -> dict:
    from purireid.evaluation.metrics import evaluate_features, evaluate_rank

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from evaluation_reference import sklearn_reference

    qf, gf, qp, gp, qc, gc = make_data(size, mode)
    if case in ("rank", "reference"):
        d = distmat(qf, gf)
        del qf, gf
        fn, args = (evaluate_rank if case == "rank" else sklearn_reference), (d, qp, gp, qc, gc)
        kwargs = {}
    else:
        fn, args = evaluate_features, (qf, gf, qp, gp, qc, gc)
        kwargs = {"topk": 10}
    before = current_rss_gb()
    with RssSampler() as rss:
        t = time.perf_counter()
        res = fn(*args, **kwargs)
        secs = time.perf_counter() - t
    return {
        "size": size,
        "case": case,
        "mode": mode,
        "seconds": secs,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # whole process
        "rss_before_gb": before,  # inputs in memory
        "eval_peak_gb": rss.peak,  # highest RSS during the call
        "mAP": res["mAP"],
        "mINP": res["mINP"],
        "cmc": [float(x) for x in res["cmc"]],
        "num_valid_queries": res["num_valid_queries"],
    }


def spawn(size: str, case: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--sizes", size, "--modes", mode],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    ap.add_argument("--case", choices=["rank", "reference", "features"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process
        print(json.dumps(run_case(args.sizes[0], args.case, args.modes[0])))
        return

    import torch

    print(f"# bench_evaluation  cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} dim={DIM}")
    for size in args.sizes:
        for mode in args.modes:
            nq, ng = SIZES[size][:2]
            cases = ["rank", "reference", "features"] if size == "market" else ["rank", "features"]
            res = {c: spawn(size, c, mode) for c in cases}
            tag = f"{size:6s} {mode:9s} {nq}x{ng}"
            for c in cases:
                r = res[c]
                print(
                    f"{tag} {c:9s}: {r['seconds']:7.2f} s  RSS during call {r['eval_peak_gb']:5.2f} GB "
                    f"(inputs {r['rss_before_gb']:5.2f} GB, +{r['eval_peak_gb'] - r['rss_before_gb']:.2f})  "
                    f"mAP {r['mAP']:.6f}  mINP {r['mINP']:.6f}  R1 {r['cmc'][0]:.6f}  "
                    f"valid queries {r['num_valid_queries']}"
                )
            if "reference" in res:
                a, b = res["rank"], res["reference"]
                dmap = abs(a["mAP"] - b["mAP"])
                dinp = abs(a["mINP"] - b["mINP"])
                dcmc = float(np.max(np.abs(np.array(a["cmc"]) - np.array(b["cmc"]))))
                print(
                    f"{tag} speed-up evaluate_rank vs per-query sklearn loop: "
                    f"{b['seconds'] / a['seconds']:.1f}x  |dmAP| {dmap:.2e}  |dmINP| {dinp:.2e}  max|dCMC| {dcmc:.2e}"
                )
            a, f = res["rank"], res["features"]
            print(
                f"{tag} evaluate_features vs evaluate_rank: |dmAP| {abs(a['mAP'] - f['mAP']):.2e}  "
                f"max|dCMC| {float(np.max(np.abs(np.array(a['cmc']) - np.array(f['cmc'])))):.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
