"""Explanations: Grad-CAM of the detector (and of the classifier's top class), a Canny edge view of the
bone, a hybrid overlay of both on the original, and the heatmap's peak region as a box.

Grad-CAM (Selvaraju et al., 2017) is taken on the last convolutional stage of the shared backbone: the
gradient of the chosen logit with respect to that stage's activations is averaged per channel, the
weighted sum of the activations is rectified and normalised to [0, 1]. Only the heads are differentiated,
so it costs little beyond the forward pass. Maps are computed on the model input and mapped back to the
original image geometry (``Explanation`` images always have the original's shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.models.preprocess import Geometry, map_to_original, resize_long_side
from pipeline.types import Box

if TYPE_CHECKING:
    import torch

PEAK_FRACTION = 0.5  # the peak region is the connected area above this fraction of the maximum
EDGE_COLOUR = (0, 255, 255)  # cyan (RGB)


def grad_cam(features: torch.Tensor, score: torch.Tensor, retain_graph: bool = False) -> np.ndarray:
    """Grad-CAM map (h, w) in [0, 1] of ``score`` with respect to ``features`` (1, C, h, w) (the torch runtime;
    the NumPy detector computes the same map in closed form: ``NumpyFractureNet.cam``)."""
    import torch

    (grads,) = torch.autograd.grad(score, features, retain_graph=retain_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1))[0].detach().numpy().astype(np.float32)
    peak = float(cam.max())
    if peak <= 0 or not np.isfinite(peak):
        return np.zeros_like(cam)
    return cam / peak


def heatmap_to_original(cam: np.ndarray, geom: Geometry) -> np.ndarray:
    """Upsample a Grad-CAM map to the original geometry, clipped to [0, 1] (in place: one full-size map)."""
    up = map_to_original(cam, geom)
    return np.clip(up, 0.0, 1.0, out=up)


def peak_box(heatmap: np.ndarray, fraction: float = PEAK_FRACTION, work_size: int = 256) -> Box | None:
    """Bounding box (original coordinates) of the connected region around the heatmap's maximum."""
    h, w = heatmap.shape
    if h == 0 or w == 0 or float(heatmap.max()) <= 0:
        return None
    s = min(1.0, work_size / max(h, w))
    small = cv2.resize(heatmap, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) \
        if s < 1 else heatmap
    peak_val = float(small.max())
    mask = (small >= fraction * peak_val).astype(np.uint8)
    _n, labels = cv2.connectedComponents(mask, connectivity=8)
    py, px = np.unravel_index(int(np.argmax(small)), small.shape)
    ys, xs = np.nonzero(labels == labels[py, px])
    sx, sy = w / small.shape[1], h / small.shape[0]
    x0, x1 = int(np.floor(xs.min() * sx)), int(np.ceil((xs.max() + 1) * sx))
    y0, y1 = int(np.floor(ys.min() * sy)), int(np.ceil((ys.max() + 1) * sy))
    return Box(max(0, x0), max(0, y0), min(w, x1), min(h, y1))


def peak_point(heatmap: np.ndarray) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


def edge_view(pixels: np.ndarray, work_size: int = 768) -> np.ndarray:
    """Canny edges (uint8 {0, 255}) of the bone at the original geometry.

    Computed on a copy reduced to ``work_size`` (area interpolation also suppresses quantum noise) and
    smoothed; thresholds come from the gradient-magnitude distribution; edges are kept on the bright (bone)
    part found by Otsu's threshold, then mapped back with nearest-neighbour interpolation.
    """
    h, w = pixels.shape
    small = resize_long_side(pixels, work_size) if max(h, w) > work_size else pixels
    gray = to_uint8(small)
    blur = cv2.GaussianBlur(gray, (0, 0), 1.6)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    hi = float(np.percentile(mag, 95))
    if hi <= 0:
        return np.zeros((h, w), np.uint8)
    edges = cv2.Canny(blur, hi * 0.5, hi, L2gradient=True)
    _t, bone = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = max(3, (max(gray.shape) // 100) | 1)
    bone = cv2.dilate(bone, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    edges = cv2.bitwise_and(edges, bone)
    if edges.shape != (h, w):
        edges = cv2.resize(edges, (w, h), interpolation=cv2.INTER_NEAREST)
    return edges


def hybrid_overlay(pixels: np.ndarray, heatmap: np.ndarray, edges: np.ndarray, alpha: float = 0.55,
                   band_rows: int = 256) -> np.ndarray:
    """RGB uint8: the original in gray, the heatmap in a JET colour map blended where it is high, and the
    bone edges in cyan on top."""
    # Blended in uint8 by OpenCV with per-pixel weights, in bands of ``band_rows`` rows: every step is per pixel,
    # so the result is the whole image's, while the temporaries (grey and colour RGB, two float weight maps) are a
    # band's, not a 2000 px image's (each ~10 MB there, measured for issue #9).
    h, w = heatmap.shape
    out = np.empty((h, w, 3), np.uint8)
    for top in range(0, h, band_rows):
        rows = slice(top, min(h, top + band_rows))
        heat = heatmap[rows]
        base = cv2.cvtColor(to_uint8(pixels[rows]), cv2.COLOR_GRAY2RGB)
        colour = cv2.cvtColor(cv2.applyColorMap(to_uint8(heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        a = np.clip(alpha * heat, 0.0, 1.0).astype(np.float32)
        band = cv2.blendLinear(base, colour, 1.0 - a, a)
        band[edges[rows] > 0] = EDGE_COLOUR
        out[rows] = band
    return out


def heatmap_grey(heatmap: np.ndarray, band_rows: int = 256) -> np.ndarray:
    """A [0, 1] map as uint8 (NaN as 0), converted in bands of rows (no full-size float temporary)."""
    out = np.empty(heatmap.shape, np.uint8)
    for top in range(0, heatmap.shape[0], band_rows):
        out[top:top + band_rows] = to_uint8(np.nan_to_num(heatmap[top:top + band_rows]))
    return out


def heatmap_bgr(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap alone as a BGR JET image (OpenCV's order, for writing)."""
    return cv2.applyColorMap(heatmap_grey(heatmap), cv2.COLORMAP_JET)


def heatmap_rgb(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap alone as an RGB JET image."""
    return cv2.cvtColor(heatmap_bgr(heatmap), cv2.COLOR_BGR2RGB)
