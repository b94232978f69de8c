"""Dense, loop-based references of docs/method.md (Pseudo labels) and the test data of the clustering tests.

Tests and benchmarks only (small N). Written straight from the spec, row by row like the
released code, with the same exactness conventions as purireid.labels.neighbours: distance key =
float64 squared Euclidean of the float32 inputs, clipped at 0, rounded to the 2**-22 grid;
lists = self first, then by (key, index); V, query expansion and Jaccard in float64, final
distances float32. `densify` turns the sparse results into the dense form compared here;
`clustered` makes small clustered feature sets (optionally with ties and duplicates).
"""

from __future__ import annotations

import numpy as np

GRID = 2.0**22


def densify(m) -> np.ndarray:
    """Dense float32 array of a sparse distance matrix whose absent entries mean distance 1."""
    m = m.tocsr()
    d = np.ones(m.shape, dtype=np.float32)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    d[rows, m.indices] = m.data
    return d


def clustered(n: int, dim: int = 32, ids: int | None = None, noise: float = 0.5, seed: int = 0,
              duplicates: int = 0, quantise: bool = False) -> np.ndarray:
    """n unit vectors around ~n/8 random centres; `quantise` rounds the coordinates first (many
    exactly tied distances), `duplicates` copies that many random rows over others."""
    rng = np.random.default_rng(seed)
    ids = ids or max(2, n // 8)
    centres = rng.standard_normal((ids, dim))
    x = centres[rng.integers(0, ids, n)] + noise * rng.standard_normal((n, dim))
    if quantise:
        x = np.round(x)
        x[np.all(x == 0, axis=1), 0] = 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    if duplicates:
        src = rng.integers(0, n, duplicates)
        dst = rng.choice(n, duplicates, replace=False)
        x[dst] = x[src]
    return x


def dense_keys(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    n = (x64**2).sum(1)
    d = n[:, None] + n[None, :] - 2.0 * (x64 @ x64.T)
    key = (np.rint(np.maximum(d, 0.0) * GRID) / GRID).astype(np.float32)
    np.fill_diagonal(key, 0.0)
    return key


def ranking(keys: np.ndarray, length: int) -> np.ndarray:
    """For each row: self, then the others sorted by (key, index); first `length` entries."""
    n = keys.shape[0]
    out = np.empty((n, length), dtype=np.int64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        others.sort(key=lambda j: (keys[i, j], j))
        out[i] = ([i] + others)[:length]
    return out


def k_reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]  # slicing past the end keeps all columns: the k1 cap
    return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=np.int64)


def v_matrix(x: np.ndarray, k1: int, k2: int, list_len: int, weight_fn=None,
             key_offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    keys = dense_keys(x)
    if key_offset is not None:  # float32, added to the off-diagonal keys (the same-camera offset)
        keys = (keys + key_offset.astype(np.float32)).astype(np.float32)
        np.fill_diagonal(keys, 0.0)
    n = keys.shape[0]
    rank = ranking(keys, list_len)
    half = int(np.around(k1 / 2))
    V = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        r1 = k_reciprocal(rank, i, k1)
        expanded = list(r1)
        for c in r1:
            r2 = k_reciprocal(rank, c, half)
            if len(np.intersect1d(r2, r1)) > 2 / 3 * len(r2):
                expanded.extend(r2)
        expanded = np.unique(expanded)
        d = keys[i, expanded].astype(np.float64)
        if weight_fn is not None:
            d = weight_fn(i, d)
        w = np.exp(-(d - d.min()))
        V[i, expanded] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return V, keys


def jaccard_from_v(V: np.ndarray, rows=None) -> np.ndarray:
    n = V.shape[0]
    rows = range(n) if rows is None else rows
    out = []
    for i in rows:
        s = np.zeros(n)
        for m in np.flatnonzero(V[i]):
            js = np.flatnonzero(V[:, m])
            s[js] += np.minimum(V[i, m], V[js, m])
        d = np.maximum(1.0 - s / (2.0 - s), 0.0)
        d[i] = 0.0
        out.append(d.astype(np.float32))
    return np.stack(out)


def jaccard_reference(x: np.ndarray, k1: int = 30, k2: int = 6, key_offset: np.ndarray | None = None) -> np.ndarray:
    n = len(x)
    V, _ = v_matrix(x, k1, k2, list_len=min(k1, n), key_offset=key_offset)
    return jaccard_from_v(V)


def fuse_reference(dg: np.ndarray, du: np.ndarray, dl: np.ndarray, lambda1: float = 0.15) -> np.ndarray:
    return (1 - 2 * lambda1) * dg + lambda1 * du + lambda1 * dl


def rerank_reference(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    x = np.concatenate([q, g]).astype(np.float32)
    n, nq = len(x), len(q)
    keys = dense_keys(x).astype(np.float64)
    rowmax2 = keys.max(axis=1) ** 2
    V, _ = v_matrix(x, k1, k2, list_len=min(k1 + 1, n), weight_fn=lambda i, d: d**2 / rowmax2[i])
    jac = jaccard_from_v(V, rows=range(nq))[:, nq:]
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    d = np.maximum((q64**2).sum(1)[:, None] + (g64**2).sum(1)[None] - 2 * q64 @ g64.T, 0)
    orig = d**2 / rowmax2[:nq, None]
    return jac * (1 - lambda_value) + orig * lambda_value
