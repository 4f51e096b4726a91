"""Temperature scaling (Guo et al., 2017) and the operating point, both fitted on the validation split."""

from __future__ import annotations

import numpy as np

TARGET_SENSITIVITY = 0.95  # chosen on validation, leaving margin above the 0.92 requirement
BAND_SENSITIVITY = 0.99  # lower edge of the indeterminate band
BAND_SPECIFICITY = 0.97  # upper edge of the indeterminate band


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Logistic function that never overflows (tanh form), for any logit however extreme."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def binary_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    y = labels.astype(np.float64)
    return float(np.mean(np.logaddexp(0, z) - y * z))


def multiclass_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the validation NLL (grid over log T, then a local refinement)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 1.0
    nll = multiclass_nll if logits.ndim == 2 else binary_nll
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    losses = [nll(logits, labels, float(t)) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 101))
    return float(fine[int(np.argmin([nll(logits, labels, float(t)) for t in fine]))])


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(temperature, shift)`` such that ``sigmoid((logit + shift) / temperature)`` minimises
    the NLL. Temperature alone cannot remove a bias (every logit too high, say), which the whole-image head
    refit or a change of domain can leave; the shift can be folded into the detection head's bias."""
    z = np.asarray(logits, dtype=np.float64)
    truth = np.asarray(labels).astype(bool)
    if len(z) == 0 or truth.all() or not truth.any():
        return 1.0, 0.0
    w, c = fit_logistic(z[:, None], truth, l2=0.0, start=(1.0 / max(float(np.std(z)), 1e-3), 0.0))
    a = float(w[0])
    if not np.isfinite(a) or a <= 1e-6:
        return fit_temperature(z, truth), 0.0
    return float(1.0 / a), float(c / a)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-4,
                 start: tuple[float, ...] | None = None) -> tuple[np.ndarray, float]:
    """Logistic regression ``sigmoid(features @ w + b)`` by Newton's method on the NLL, with Platt's smoothed
    targets (finite on a separable set) and a small ridge ``l2`` on ``w``, from ``start`` (``w`` then ``b``;
    default zeros). Returns ``(w, b)``. Platt scaling (:func:`fit_platt`) is the one-feature case."""
    x = np.asarray(features, dtype=np.float64)
    truth = np.asarray(labels).astype(bool)
    if x.ndim != 2 or len(x) != len(truth):
        raise ValueError("features must be (n, k) with one label per row")
    if len(x) == 0 or truth.all() or not truth.any():
        raise ValueError("a logistic fit needs positives and negatives")
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    y = np.where(truth, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a = np.hstack([x, np.ones((len(x), 1))])
    ridge = np.diag([l2] * x.shape[1] + [0.0])
    theta = np.zeros(a.shape[1]) if start is None else np.array(start, dtype=np.float64)
    for _ in range(100):
        p = sigmoid(a @ theta)
        g = a.T @ (p - y) / len(y) + ridge @ theta
        h = (a * (p * (1 - p))[:, None]).T @ a / len(y) + ridge + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(h, g)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def threshold_for_sensitivity(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Largest threshold whose sensitivity (p >= t) is at least ``target``."""
    pos = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(labels).astype(bool)])
    if len(pos) == 0:
        return 0.5
    k = int(np.floor((1.0 - target) * len(pos)))
    return float(pos[min(max(k, 0), len(pos) - 1)])


def threshold_for_specificity(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Smallest threshold whose specificity (p < t for negatives) is at least ``target``."""
    neg = np.sort(np.asarray(probs, dtype=np.float64)[~np.asarray(labels).astype(bool)])
    if len(neg) == 0:
        return 0.5
    k = int(np.ceil(target * len(neg))) - 1
    return float(np.nextafter(neg[min(max(k, 0), len(neg) - 1)], 1.0))


def operating_point(probs: np.ndarray, labels: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY
                    ) -> dict[str, object]:
    """Threshold for high sensitivity plus an indeterminate band around it, with validation figures."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    t = threshold_for_sensitivity(probs, labels, target_sensitivity)
    lo = min(t, threshold_for_sensitivity(probs, labels, BAND_SENSITIVITY))
    hi = max(t, threshold_for_specificity(probs, labels, BAND_SPECIFICITY))
    pred = probs >= t
    sens = float((pred & labels).sum() / max(1, labels.sum()))
    spec = float((~pred & ~labels).sum() / max(1, (~labels).sum()))
    indet = float(((probs >= lo) & (probs < hi)).mean()) if hi > lo else 0.0
    return {
        "threshold": t,
        "rule": f"largest calibrated-probability threshold with validation sensitivity >= {target_sensitivity}",
        "validation_sensitivity": sens,
        "validation_specificity": spec,
        "indeterminate_band": [lo, hi],
        "indeterminate_rule": (
            f"calibrated probability in [threshold at validation sensitivity {BAND_SENSITIVITY}, threshold at "
            f"validation specificity {BAND_SPECIFICITY}) -> call 'indeterminate'"
        ),
        "validation_indeterminate_share": indet,
    }
