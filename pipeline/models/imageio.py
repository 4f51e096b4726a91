"""Reading local image files into a :class:`~pipeline.types.Radiograph`.

DICOM and anything else go through the lead's ``dicom.image.load_radiograph`` when it is available; until
then (and for training data, where speed matters) PNG/JPEG are read with OpenCV here. 16-bit PNGs are read
as stored (the generator writes bone-bright MONOCHROME2); colour images keep their RGB in ``rgb``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.types import Radiograph

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", "")


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """uint8/uint16/float image to float32 in [0, 1]."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    out = img.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def read_gray(path: str | Path) -> np.ndarray:
    """Fast grayscale read (float32 [0, 1]) of a PNG/JPEG for training; colour is converted to gray."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot decode image")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return to_unit_float(img)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a PNG/JPEG/TIFF file as :func:`read_gray` would decode it, from its header when Pillow
    can read one (no pixels decoded), else by decoding."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return int(img.size[0]), int(img.size[1])
    except (OSError, ValueError):
        h, w = read_gray(path).shape[:2]
        return w, h


def radiograph_from_array(img: np.ndarray, source: str = "array") -> Radiograph:
    """Wrap a decoded array (gray uint8/uint16/float, or RGB uint8) in a Radiograph."""
    if img.ndim == 3:
        rgb = img[..., :3].astype(np.uint8)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return Radiograph(pixels=to_unit_float(gray), rgb=rgb, source=source)
    return Radiograph(pixels=to_unit_float(img), source=source)


def _lead_loader() -> Callable[[Any], Radiograph] | None:
    try:
        module = importlib.import_module("dicom.image")
    except ImportError:
        return None
    loader = getattr(module, "load_radiograph", None)
    return loader if callable(loader) else None


def _read_dicom_fallback(path: Path) -> Radiograph:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    arr = apply_modality_lut(ds.pixel_array, ds)
    with contextlib.suppress(Exception):  # VOI absent or unusable: fall back to min/max
        arr = apply_voi_lut(arr, ds)
    img = to_unit_float(np.asarray(arr, dtype=np.float32))
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    spacing = getattr(ds, "PixelSpacing", None)
    return Radiograph(
        pixels=img,
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing else None,
        modality=getattr(ds, "Modality", None),
        photometric_interpretation=photometric,
        source=str(path),
    )


def load_file(path: str | Path) -> Radiograph:
    """Decode a local DICOM/PNG/JPEG file."""
    p = Path(path)
    lead = _lead_loader()
    if lead is not None:
        return lead(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError(f"{p}: cannot decode image")
        if img.ndim == 3:
            if img.shape[2] == 4:
                img = img[..., :3]
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            if img.dtype != np.uint8:
                img = (to_unit_float(img) * 255).astype(np.uint8)
        return radiograph_from_array(img, source=str(p))
    return _read_dicom_fallback(p)
