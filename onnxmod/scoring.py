"""Score calibration fitted on calibration logits: Platt scaling and temperature scaling."""

from __future__ import annotations

import numpy as np


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(z))


def fit_platt(logit: np.ndarray, positive: np.ndarray, iters: int = 100) -> tuple[float, float, float, float]:
    """Fit P(positive) = sigmoid(a * logit + b) by damped Newton (Platt's smoothed targets).

    Returns (a, b, nll_before, nll_after) on the hard labels; nll_before uses sigmoid(logit).
    """
    x = np.asarray(logit, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = y.sum(), (~y).sum()
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))  # Platt's targets: no infinite slopes

    def loss(ab: np.ndarray) -> float:
        z = ab[0] * x + ab[1]
        return float(-np.sum(t * _log_sigmoid(z) + (1 - t) * _log_sigmoid(-z)))

    ab = np.array([1.0, 0.0])
    cur = loss(ab)
    for _ in range(iters):
        p = _sigmoid(ab[0] * x + ab[1])
        g = np.array([np.sum((p - t) * x), np.sum(p - t)])
        w = p * (1 - p) + 1e-12
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        lr = 1.0
        while lr > 1e-6 and loss(ab - lr * step) > cur:  # backtracking keeps every step downhill
            lr /= 2
        new = ab - lr * step
        new_loss = loss(new)
        done = cur - new_loss < 1e-12 * max(1.0, abs(cur))
        ab, cur = (new, new_loss) if new_loss <= cur else (ab, cur)
        if done:
            break

    def nll(aa: float, bb: float) -> float:
        z = aa * x + bb
        return float(-np.mean(np.where(y, _log_sigmoid(z), _log_sigmoid(-z))))

    return float(ab[0]), float(ab[1]), nll(1.0, 0.0), nll(ab[0], ab[1])


def softmax_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the NLL of softmax(logits / T) (golden-section search on log T)."""
    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    f = lambda lt: softmax_nll(logits, labels, float(np.exp(lt)))  # noqa: E731
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if f(c) < f(d):
            hi = d
        else:
            lo = c
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def binary_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (rank statistic, ties averaged); None without both classes."""
    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts - 1) / 2 + 1, counts)  # ties share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
