"""Input preparation shared by training and inference, so both see exactly the same tensors.

Detector/classifier: the radiograph (float32, bone-bright, [0, 1]) is resized with ``cv2.INTER_AREA`` so
that its long side is ``long_side`` px, padded right/bottom to a multiple of 32 with zeros (air), then
standardised per image (mean/std over the unpadded image). Type reader: a ``size`` square patch centred on a
point of the original image, cut at the scale that gives the whole image a long side of ``long_side`` px (air
beyond the edges), standardised over the patch. Validity: letterboxed into a ``size`` square,
values mapped as ``(x - 0.5) / 0.25`` so absolute brightness and contrast still count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # torch is loaded only by the tensor helpers: the NumPy runtime never needs it
    import torch

STRIDE = 32  # inputs are padded to a multiple of the network's deepest stride (nets.INPUT_MULTIPLE)


@dataclass(frozen=True)
class Geometry:
    """How a model input maps back onto the original image."""

    orig_h: int
    orig_w: int
    scaled_h: int
    scaled_w: int
    padded_h: int
    padded_w: int

    @property
    def scale(self) -> float:
        return self.scaled_h / self.orig_h


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) == (h, w):
        return img
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (nw, nh), interpolation=interp)


def standardise(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32, copy=False)
    mean = float(img.mean())
    std = float(img.std())
    return (img - mean) / max(std, 1e-3)


def fracture_input(pixels: np.ndarray, long_side: int) -> tuple[np.ndarray, Geometry]:
    """Return the (H, W) float32 network input and the geometry needed to map maps back to the original."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    h, w = pixels.shape
    small = resize_long_side(pixels.astype(np.float32, copy=False), long_side)
    sh, sw = small.shape
    ph, pw = -(-sh // STRIDE) * STRIDE, -(-sw // STRIDE) * STRIDE
    mean = float(small.mean())
    std = max(float(small.std()), 1e-3)
    out = np.full((ph, pw), -mean / std, dtype=np.float32)
    out[:sh, :sw] = (small - mean) / std
    return out, Geometry(h, w, sh, sw, ph, pw)


def mirrored_input(x: np.ndarray, geom: Geometry) -> np.ndarray:
    """The network input of the left-right mirror of the image that :func:`fracture_input` made ``x`` from,
    without resizing the mirror again: the resized image flipped, the padding still right and below, the same
    standardisation (a resize commutes with the flip, to float rounding)."""
    out = x.copy()
    out[:geom.scaled_h, :geom.scaled_w] = x[:geom.scaled_h, :geom.scaled_w][:, ::-1]
    return out


def as_batch(x: np.ndarray) -> torch.Tensor:
    """(H, W) array -> (1, 1, H, W) tensor sharing its memory (for the torch networks)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]


def prepare_fracture_input(pixels: np.ndarray, long_side: int) -> tuple[torch.Tensor, Geometry]:
    """:func:`fracture_input` as a (1, 1, H, W) tensor."""
    x, geom = fracture_input(pixels, long_side)
    return as_batch(x), geom


def map_to_original(fmap: np.ndarray, geom: Geometry) -> np.ndarray:
    """Upsample a low-resolution map computed on the padded input back to the original geometry."""
    fh, fw = fmap.shape
    # Cells that cover the unpadded area only.
    ch = max(1, min(fh, round(geom.scaled_h / geom.padded_h * fh)))
    cw = max(1, min(fw, round(geom.scaled_w / geom.padded_w * fw)))
    up = cv2.resize(fmap[:ch, :cw].astype(np.float32), (geom.orig_w, geom.orig_h),
                    interpolation=cv2.INTER_LINEAR)
    return up


def seg_peak(seg: np.ndarray, geom: Geometry, stride: int) -> tuple[float, float]:
    """(x, y) in original pixels of the centre of the strongest cell of a 1/``stride`` map of the padded input
    (cells over the padding are ignored)."""
    x, y, _value = seg_peaks(seg, geom, stride, 1, 0.0)[0]
    return x, y


def seg_peaks(seg: np.ndarray, geom: Geometry, stride: int, count: int,
              min_distance: float) -> list[tuple[float, float, float]]:
    """Up to ``count`` local peaks of a 1/``stride`` map of the padded input, strongest first, as (x, y, value):
    (x, y) in original pixels (as :func:`seg_peak`, which is the first), ``value`` the map's value there. Each
    later peak is the strongest cell left after clearing the cells within ``min_distance`` original pixels (per
    axis) of those before it; cells over the padding are ignored."""
    ch = max(1, min(seg.shape[0], -(-geom.scaled_h // stride)))
    cw = max(1, min(seg.shape[1], -(-geom.scaled_w // stride)))
    left = seg[:ch, :cw].astype(np.float64)
    r = max(0, int(round(min_distance * geom.scale / stride)))
    s = geom.scale
    peaks: list[tuple[float, float, float]] = []
    for _ in range(max(1, count)):
        iy, ix = np.unravel_index(int(np.argmax(left)), (ch, cw))
        if peaks and left[iy, ix] == -np.inf:
            break
        x = min(geom.orig_w - 1.0, (ix + 0.5) * stride / s)
        y = min(geom.orig_h - 1.0, (iy + 0.5) * stride / s)
        peaks.append((float(x), float(y), float(seg[iy, ix])))
        left[max(0, iy - r):iy + r + 1, max(0, ix - r):ix + r + 1] = -np.inf
    return peaks


@dataclass(frozen=True)
class Patch:
    """Where a type-reader patch lies in the original image: a square of ``side`` px at (``left``, ``top``)."""

    left: int
    top: int
    side: int


def cut_patch(pixels: np.ndarray, centre: tuple[float, float], long_side: int, size: int) -> tuple[np.ndarray, Patch]:
    """The ``size`` square around ``centre`` (x, y, original pixels) at the scale ``long_side / max(h, w)``:
    float32, air (0) beyond the image's edges, not yet standardised."""
    h, w = pixels.shape
    side = max(1, int(round(size * max(h, w) / long_side)))
    left, top = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    region: np.ndarray = np.zeros((side, side), dtype=np.float32)
    y0, x0, y1, x1 = max(0, top), max(0, left), min(h, top + side), min(w, left + side)
    if y1 > y0 and x1 > x0:
        region[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
    if side != size:
        region = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return region, Patch(left, top, side)


def standardise_patch(patch: np.ndarray) -> torch.Tensor:
    """(1, 1, P, P) tensor: the patch standardised over itself (training and inference share this)."""
    return as_batch(standardise(patch))


def patch_to_original(pmap: np.ndarray, patch: Patch, shape: tuple[int, int]) -> np.ndarray:
    """Paste a map computed on a patch back into a zero map of the original ``shape`` (h, w)."""
    out = np.zeros(shape, dtype=np.float32)
    add_patch_map(out, pmap, patch)
    return out


def add_patch_map(out: np.ndarray, pmap: np.ndarray, patch: Patch, weight: float = 1.0) -> np.ndarray:
    """Add ``weight`` times a map computed on a patch, resized to the patch's side, into ``out`` (a map of the
    original geometry) where the patch lies over it, in place; only the patch's area is touched."""
    h, w = out.shape
    y0, x0 = max(0, patch.top), max(0, patch.left)
    y1, x1 = min(h, patch.top + patch.side), min(w, patch.left + patch.side)
    if y1 > y0 and x1 > x0:
        up = cv2.resize(pmap.astype(np.float32), (patch.side, patch.side), interpolation=cv2.INTER_LINEAR)
        out[y0:y1, x0:x1] += weight * up[y0 - patch.top:y1 - patch.top, x0 - patch.left:x1 - patch.left]
    return out


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size`` and pad to a ``size`` square (zeros), keeping the aspect."""
    small = resize_long_side(img, size)
    out = np.zeros((size, size), dtype=np.float32)
    h, w = small.shape[:2]
    y0, x0 = (size - h) // 2, (size - w) // 2
    out[y0:y0 + h, x0:x0 + w] = small
    return out


def validity_input(gray: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 input of the radiograph check from a [0, 1] grayscale image."""
    box = letterbox(gray.astype(np.float32, copy=False), size)
    return (box - 0.5) / 0.25


def prepare_validity_input(gray: np.ndarray, size: int) -> torch.Tensor:
    """:func:`validity_input` as a (1, 1, size, size) tensor."""
    return as_batch(validity_input(gray, size))
