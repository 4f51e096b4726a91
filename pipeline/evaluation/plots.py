"""Reliability diagram and confusion-matrix images drawn with OpenCV (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.45, colour: tuple[int, int, int] = BLACK,
          thickness: int = 1) -> None:
    cv2.putText(img, s, org, FONT, scale, colour, thickness, cv2.LINE_AA)


def reliability_diagram(bins: Sequence[dict[str, float]], ece: float, path: str | Path, title: str = "") -> Path:
    """Observed fracture rate against mean predicted probability per bin, with bin counts as bar shading."""
    size, margin = 520, 70
    img = np.full((size + 2 * margin, size + 2 * margin, 3), 255, np.uint8)
    x0, y0 = margin, margin + size

    def pt(p: float, q: float) -> tuple[int, int]:
        return int(x0 + p * size), int(y0 - q * size)

    for t in np.linspace(0, 1, 6):
        cv2.line(img, pt(t, 0), pt(t, 1), (230, 230, 230), 1)
        cv2.line(img, pt(0, t), pt(1, t), (230, 230, 230), 1)
        _text(img, f"{t:.1f}", (pt(t, 0)[0] - 10, y0 + 20))
        _text(img, f"{t:.1f}", (x0 - 40, pt(0, t)[1] + 5))
    total = max(1, sum(int(b["count"]) for b in bins))
    for b in bins:
        if not b["count"]:
            continue
        share = b["count"] / total
        shade = int(235 - 120 * min(1.0, share * 4))
        cv2.rectangle(img, pt(b["lo"], 0), pt(b["hi"], float(b["fraction_positive"])), (shade, shade, 255), -1)
        cv2.rectangle(img, pt(b["lo"], 0), pt(b["hi"], float(b["fraction_positive"])), (90, 90, 200), 1)
        cv2.circle(img, pt(float(b["mean_probability"]), float(b["fraction_positive"])), 4, (200, 60, 0), -1)
    cv2.line(img, pt(0, 0), pt(1, 1), (120, 120, 120), 1, cv2.LINE_AA)
    cv2.rectangle(img, pt(0, 0), pt(1, 1), BLACK, 1)
    _text(img, title or "Reliability diagram (detector, calibrated)", (margin, 30), 0.6)
    _text(img, f"ECE = {ece:.4f}   bars: observed fracture rate per bin; dots: mean predicted", (margin, 52), 0.42)
    _text(img, "predicted probability of fracture", (x0 + size // 2 - 120, y0 + 45))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), img)
    return out


def confusion_image(cm: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: truth, columns: prediction) with counts in the cells."""
    n = len(labels)
    cell, left, top = 48, 170, 190
    w, h = left + n * cell + 20, top + n * cell + 40
    img = np.full((h, w, 3), 255, np.uint8)
    rows = cm.sum(axis=1, keepdims=True)
    norm = cm / np.maximum(rows, 1)
    for i in range(n):
        for j in range(n):
            v = float(norm[i, j])
            colour = (int(255 - 200 * v), int(255 - 120 * v), int(255 - 30 * v))
            p0 = (left + j * cell, top + i * cell)
            cv2.rectangle(img, p0, (p0[0] + cell, p0[1] + cell), colour, -1)
            cv2.rectangle(img, p0, (p0[0] + cell, p0[1] + cell), (200, 200, 200), 1)
            _text(img, str(int(cm[i, j])), (p0[0] + 6, p0[1] + 30), 0.42, WHITE if v > 0.6 else BLACK)
        _text(img, labels[i], (8, top + i * cell + 30), 0.45)
    for j, name in enumerate(labels):
        canvas = np.full((cell, top - 10, 3), 255, np.uint8)
        _text(canvas, name, (4, 30), 0.45)
        rot = cv2.rotate(canvas, cv2.ROTATE_90_COUNTERCLOCKWISE)
        img[5:5 + rot.shape[0], left + j * cell:left + j * cell + rot.shape[1]] = rot
    _text(img, title or "Fracture type confusion (rows: truth, columns: prediction)", (8, h - 12), 0.5)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), img)
    return out
