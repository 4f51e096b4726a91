"""Acquisition shifts: named, deterministic changes to a radiograph that the bundled models were not trained
on, to measure how their figures hold up on images that do not come from the project's own generator.

Real radiographs differ from generated ones in how they were processed after acquisition far more than in the
bone: every DR/CR vendor applies its own tone curve, multi-scale contrast equalisation and edge enhancement;
uploads are often 8-bit JPEGs, downscaled; detectors differ in noise and sharpness; the limb fills less or more
of the field. Each shift here imitates one of those, at a strength beyond the training augmentation
(:mod:`pipeline.training.augment`), so a drop in a figure names the kind of image the models would be fragile on.

A shift maps the ``[0, 1]`` bone-bright pixels and the fracture box (original pixels) to new ones; it never
changes the label. ``fracture-node evaluate --shift NAME`` applies one to every radiograph of a labelled folder
(negatives are left as they are), and ``bench/robustness.py`` runs the whole list.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.training.augment import clahe, multiscale_equalise, wider_field

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Shift:
    """One named acquisition shift. ``apply(pixels, box, rng)`` returns the new pixels and the box."""

    name: str
    description: str
    apply: Callable[[np.ndarray, Box | None, np.random.Generator], tuple[np.ndarray, Box | None]]


def _unit(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _gamma(g: float) -> Callable[[np.ndarray, Box | None, np.random.Generator], tuple[np.ndarray, Box | None]]:
    def f(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
        return _unit(np.power(np.clip(px, 0, 1), g)), box
    return f


def _clahe(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    return clahe(px, 3.0, 8), box


def _sigma(px: np.ndarray, fraction: float) -> float:
    return max(1.0, fraction * max(px.shape))


def _equalise(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """Multi-scale processing as DR consoles do it: flatten the large-scale density (soft tissue, the limb's
    thickness) and boost the mid-scale detail."""
    x = px.astype(np.float32)
    return multiscale_equalise(x, _sigma(x, 1 / 12), 0.4, 2.0, _sigma(x, 1 / 100), 1.0), box


def _unsharp(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """Strong edge enhancement (an unsharp mask of a few pixels, amount 2)."""
    x = px.astype(np.float32)
    blur = cv2.GaussianBlur(x, (0, 0), _sigma(x, 1 / 400))
    return _unit(x + 2.0 * (x - blur)), box


def _noise(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """Quantum noise of a low-dose exposure: signal-dependent, sigma 0.05 at full brightness."""
    x = px.astype(np.float32)
    n = rng.standard_normal(x.shape, dtype=np.float32)
    return _unit(x + 0.05 * n * np.sqrt(np.clip(x, 0.02, 1.0))), box


def _blur(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """An unsharp detector or motion: Gaussian blur of 2 px at 1024 px long side."""
    return _unit(cv2.GaussianBlur(px.astype(np.float32), (0, 0), _sigma(px, 2 / 1024))), box


def _scale_box(box: Box | None, s: float, dx: float = 0.0, dy: float = 0.0) -> Box | None:
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return (int(x0 * s + dx), int(y0 * s + dy), int(np.ceil(x1 * s + dx)), int(np.ceil(y1 * s + dy)))


def _small_jpeg(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """A clinician's upload: downscaled to 640 px long side and saved as an 8-bit JPEG of quality 70."""
    h, w = px.shape
    s = 640 / max(h, w)
    small = cv2.resize(px.astype(np.float32), (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", (np.clip(small, 0, 1) * 255 + 0.5).astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 70])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)
    if dec is None:
        raise RuntimeError("JPEG decoding failed")
    return dec.astype(np.float32) / 255.0, _scale_box(box, small.shape[1] / w)


def _zoom_out(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """A wider field of view: the image sits centred in a canvas 1.5 times its size, the margin unexposed (air)."""
    out, _, (top, left) = wider_field(px.astype(np.float32), None, 1.5)
    return out, _scale_box(box, 1.0, left, top)


def _high_res(px: np.ndarray, box: Box | None, rng: np.random.Generator) -> tuple[np.ndarray, Box | None]:
    """A flat-panel detector's native matrix: upsampled to 2.5 times the long side (about 2 500 px)."""
    h, w = px.shape
    out = cv2.resize(px.astype(np.float32), (round(w * 2.5), round(h * 2.5)), interpolation=cv2.INTER_CUBIC)
    return _unit(out), _scale_box(box, out.shape[1] / w)


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("none", "the images as generated", lambda px, box, rng: (px, box)),
    Shift("gamma_0.4", "a much brighter tone curve (gamma 0.4)", _gamma(0.4)),
    Shift("gamma_2.5", "a much darker tone curve (gamma 2.5)", _gamma(2.5)),
    Shift("clahe", "contrast-limited adaptive histogram equalisation (clip 3, 8 x 8 tiles)", _clahe),
    Shift("equalise", "multi-scale processing: large-scale density flattened, detail boosted", _equalise),
    Shift("unsharp", "strong edge enhancement (unsharp mask, amount 2)", _unsharp),
    Shift("noise", "low-dose quantum noise (sigma 0.05 at full brightness)", _noise),
    Shift("blur", "an unsharp detector (Gaussian blur of 2 px at 1024 px)", _blur),
    Shift("small_jpeg", "an upload: 640 px long side, 8-bit JPEG quality 70", _small_jpeg),
    Shift("zoom_out", "a wider field of view (1.5x canvas, unexposed margin)", _zoom_out),
    Shift("high_res", "a flat panel's native matrix (2.5x upsampled)", _high_res),
)}


def get_shift(name: str) -> Shift:
    try:
        return SHIFTS[name]
    except KeyError:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}") from None


def shift_rng(index: int, name: str) -> np.random.Generator:
    """The random stream of one image under one shift: the same on every run (and independent of the others)."""
    return np.random.default_rng([index, zlib.crc32(name.encode())])
