"""Benchmark data shared by the store benchmarks: clustered keys and numpy's exact answer."""

from __future__ import annotations

import numpy as np

SPREAD = 0.5  # cluster radius relative to the centres' unit-normal scale


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """Points around random unit-normal centres (plain Gaussian points when there are none)."""
    if len(centers) == 0:
        return rng.standard_normal((n, dim)).astype(np.float32)
    which = rng.integers(0, len(centers), n)
    return (centers[which] + SPREAD * rng.standard_normal((n, dim))).astype(np.float32)


def brute_force_topk(
    keys: np.ndarray, norms: np.ndarray, query: np.ndarray, k: int, metric: str = "l2"
) -> np.ndarray:
    """numpy's answer (the recall truth and the latency floor); ``norms`` = |key|^2."""
    if metric == "l2":
        scores = norms - 2.0 * (keys @ query)  # squared L2 minus |q|^2: same order
    elif metric == "ip":
        scores = -(keys @ query)
    else:
        scores = -(keys @ query) / np.sqrt(norms)
    top = np.argpartition(scores, k)[:k]
    return top[np.argsort(scores[top])]


def bench_values(keys: np.ndarray, value_dim: int | None) -> np.ndarray:
    """Values for a benchmark insert: the keys themselves, or zeros when the value width differs."""
    if value_dim is None or value_dim == keys.shape[1]:
        return keys
    return np.zeros((len(keys), value_dim), np.float32)
