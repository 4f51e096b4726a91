"""Metrics in numpy: ROC AUC, sensitivity/specificity, expected calibration error, confusion, macro-F1."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sens_spec(probs: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    p = np.asarray(probs) >= threshold
    y = np.asarray(labels).astype(bool)
    sens = float((p & y).sum() / max(1, y.sum()))
    spec = float((~p & ~y).sum() / max(1, (~y).sum()))
    return sens, spec


def sensitivity_at_specificity(probs: np.ndarray, labels: np.ndarray, min_spec: float) -> float:
    """Best sensitivity among thresholds whose specificity is at least ``min_spec``."""
    y = np.asarray(labels).astype(bool)
    neg = np.sort(np.asarray(probs, dtype=np.float64)[~y])
    pos = np.asarray(probs, dtype=np.float64)[y]
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    k = int(np.ceil(min_spec * len(neg))) - 1
    t = neg[min(max(k, 0), len(neg) - 1)]
    return float((pos > t).mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "mean_probability": float(p[sel].mean()) if n else float("nan"),
                     "fraction_positive": float(y[sel].mean()) if n else float("nan")})
    return bins


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the fracture probability: sum over equal-width bins of |mean p - observed rate| x share."""
    total = len(probs)
    if total == 0:
        return float("nan")
    ece = 0.0
    for b in reliability_bins(probs, labels, n_bins):
        if b["count"]:
            ece += b["count"] / total * abs(b["mean_probability"] - b["fraction_positive"])
    return float(ece)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(np.asarray(true, dtype=int), np.asarray(pred, dtype=int), strict=True):
        cm[t, p] += 1
    return cm


def f1_scores(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    prec = tp / np.maximum(cm.sum(axis=0), 1)
    rec = tp / np.maximum(cm.sum(axis=1), 1)
    return np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)


def macro_f1(cm: np.ndarray) -> float:
    present = cm.sum(axis=1) > 0
    f1 = f1_scores(cm)
    return float(f1[present].mean()) if present.any() else float("nan")


def accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(1, cm.sum()))
