"""Concentration of a per-module gradient-norm vector: is the update spread over the network or
focused on a few matrices? Pure numpy, vectorised over rows (one row per example)."""

from __future__ import annotations

import numpy as np


def _rows(g: np.ndarray, dtype=np.float64) -> np.ndarray:
    g = np.asarray(g, dtype=dtype)
    return g[None, :] if g.ndim == 1 else g


def gini(g: np.ndarray) -> np.ndarray:
    """G = sum_k (2k - n - 1) g_(k) / (n sum g), g sorted ascending, k = 1..n.
    0 for a uniform vector, 1 - 1/n for a one-hot one; 0 for an all-zero row. The Gini coefficient (Gini,
    1912), in the sorted form Hurley & Rickard use as a sparsity measure (IEEE Trans. Inf. Theory, 2009)."""
    # sorted in the input's precision (float32 norms sort twice as fast), summed in float64
    g = np.sort(_rows(g, None), axis=1).astype(np.float64, copy=False)
    n = g.shape[1]
    k = np.arange(1, n + 1)
    total = g.sum(axis=1)
    num = ((2 * k - n - 1) * g).sum(axis=1)
    return np.divide(num, n * total, out=np.zeros_like(total), where=total > 0)


def _moments(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row means, squared deviations and (population) variances: what cv and kurtosis share."""
    mu = g.mean(axis=1)
    d = g - mu[:, None]
    d2 = d * d  # d**4 would call pow() per element: 10x slower than squaring the squares
    return mu, d2, d2.mean(axis=1)


def _cv(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return np.divide(np.sqrt(var), mu, out=np.zeros_like(mu), where=mu > 0)


def _kurtosis(d2: np.ndarray, var: np.ndarray) -> np.ndarray:
    return np.divide((d2 * d2).mean(axis=1), var**2, out=np.zeros_like(var), where=var > 0)


def cv(g: np.ndarray) -> np.ndarray:
    """Coefficient of variation sigma/mu (population sigma)."""
    mu, _, var = _moments(_rows(g))
    return _cv(mu, var)


def kurtosis(g: np.ndarray) -> np.ndarray:
    """Pearson kurtosis E[(g - mu)^4] / sigma^4 (3 for a normal sample; 0 for a constant row); Pearson
    (Biometrika, 1905), not the excess kurtosis."""
    _, d2, var = _moments(_rows(g))
    return _kurtosis(d2, var)


def magnitude(g: np.ndarray) -> np.ndarray:
    """L2 norm over all modules: the norm of the whole (probed) gradient."""
    g = _rows(g)
    return np.sqrt(np.einsum("ij,ij->i", g, g))


_M = 0xFFFFFFFFFFFFFFFF


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips each output bit with probability ~1/2 (uint64, wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_control(ids: list[str], seed: int) -> np.ndarray:
    """Uniform [0, 1) per example from a hash of (seed, id): independent of order, sharding and batch.

    The id's UTF-8 bytes, as little-endian 8-byte words (the last one zero-padded), are folded into a
    seeded state with splitmix64 mixing, then its length; the top 53 bits are the value. Vectorised:
    one numpy pass per 8 bytes of the longest id."""
    if not ids:
        return np.zeros(0)
    raw = [rid.encode() for rid in ids]
    lengths = np.fromiter(map(len, raw), np.uint64, len(raw))
    width = max(8, -(-int(lengths.max()) // 8) * 8)
    words = np.frombuffer(np.array(raw, dtype=f"S{width}").tobytes(), dtype="<u8").reshape(len(ids), -1)
    with np.errstate(over="ignore"):
        h = _mix64(np.full(len(ids), (seed & _M) ^ 0x9E3779B97F4A7C15, dtype=np.uint64))
        for k, word in enumerate(words.T):
            mixed = _mix64(h ^ word)
            h = mixed if k == 0 else np.where(lengths > 8 * k, mixed, h)  # only an id's own words
        h = _mix64(h ^ lengths)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


_ON_NORMS = {"gini": gini, "cv": cv, "kurtosis": kurtosis, "magnitude": magnitude}


def all_metrics(grad_norms: np.ndarray, ids: list[str], seed: int,
                names: tuple[str, ...] = ("gini", "cv", "kurtosis", "magnitude", "random")) -> dict[str, np.ndarray]:
    """The routing metrics `names` (default: all) for a batch of rows, keyed by column name."""
    out, g = {}, _rows(grad_norms)  # float64 once, for every metric but gini (which sorts the input)
    if "cv" in names and "kurtosis" in names:  # one pass of moments for both
        mu, d2, var = _moments(g)
        out = {"cv": _cv(mu, var), "kurtosis": _kurtosis(d2, var)}
    for n in names:
        if n not in out:
            out[n] = (random_control(ids, seed) if n == "random" else
                      gini(grad_norms) if n == "gini" else _ON_NORMS[n](g))
    return {n: out[n] for n in names}
