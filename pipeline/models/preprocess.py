"""Input preparation shared by training and inference, so both see exactly the same tensors.

Detector/classifier: the radiograph (float32, bone-bright, [0, 1]) is resized with ``cv2.INTER_AREA`` so
that its long side is ``long_side`` px, padded right/bottom to a multiple of 32 with zeros (air), then
standardised per image (mean/std over the unpadded image). Validity: letterboxed into a ``size`` square,
values mapped as ``(x - 0.5) / 0.25`` so absolute brightness and contrast still count.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
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


def prepare_fracture_input(pixels: np.ndarray, long_side: int) -> tuple[torch.Tensor, Geometry]:
    """Return a (1, 1, H, W) tensor and the geometry needed to map maps back to the original."""
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
    return torch.from_numpy(out)[None, None], Geometry(h, w, sh, sw, ph, pw)


def map_to_original(fmap: np.ndarray, geom: Geometry) -> np.ndarray:
    """Upsample a low-resolution map computed on the padded input back to the original geometry."""
    fh, fw = fmap.shape
    # Cells that cover the unpadded area only.
    ch = max(1, min(fh, round(geom.scaled_h / geom.padded_h * fh)))
    cw = max(1, min(fw, round(geom.scaled_w / geom.padded_w * fw)))
    up = cv2.resize(fmap[:ch, :cw].astype(np.float32), (geom.orig_w, geom.orig_h),
                    interpolation=cv2.INTER_LINEAR)
    return up


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size`` and pad to a ``size`` square (zeros), keeping the aspect."""
    small = resize_long_side(img, size)
    out = np.zeros((size, size), dtype=np.float32)
    h, w = small.shape[:2]
    y0, x0 = (size - h) // 2, (size - w) // 2
    out[y0:y0 + h, x0:x0 + w] = small
    return out


def prepare_validity_input(gray: np.ndarray, size: int) -> torch.Tensor:
    """(1, 1, size, size) tensor from a [0, 1] grayscale image."""
    box = letterbox(gray.astype(np.float32, copy=False), size)
    return torch.from_numpy((box - 0.5) / 0.25)[None, None]
