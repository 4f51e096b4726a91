"""The detector's strongest segmentation peaks in training images, found once and cached.

Both trainers that learn at the detector's own candidate sites use them: the type reader (``train --task
classify --site-share``), whose patches there teach its evidence to say "no fracture here", and the fracture
network itself (``train --task fracture|detect --site-share``), whose crops there are its hardest negatives.
Running the detector over every training image is most of the cost (on two cores about 20 minutes for 6 600
images), so the peaks are kept in a JSON file keyed by each image's path, size and modification time, under a
header naming what they depend on (the detector's weights, the spacing, how many); a changed header or file is
not reused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.architecture import SEG_STRIDE
from pipeline.models.bundle import Bundle
from pipeline.models.preprocess import fracture_input, seg_peaks
from pipeline.training.datasets import Record


def file_key(path: Path) -> str:
    """An image's key in the peak cache: its path, size and modification time (a changed file is not reused)."""
    stat = Path(path).stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def read_peak_cache(path: Path, header: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The cached peaks per image key, if ``path`` holds peaks found with the same ``header``; else none."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict) or cached.get("header") != header or not isinstance(cached.get("peaks"), dict):
        return {}
    return cached["peaks"]


def write_peak_cache(path: Path, header: dict[str, Any], peaks: dict[str, list[list[float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"header": header, "peaks": peaks}))
    tmp.replace(path)  # a run killed mid-write leaves the old cache or none, never half a file


def detector_peaks(detector: Bundle, img: np.ndarray, count: int, min_distance: float) -> list[list[float]]:
    """The detector's ``count`` strongest segmentation peaks in ``img`` (float, original pixels), as at
    inference: [x, y] in original pixels, strongest first, at least ``min_distance`` px apart per axis.

    A detector loaded into the ``numpy`` runtime runs its trunk in ONNX Runtime here, one thread per process
    (a peak search runs in forked workers, one per core): the same segmentation map to 1e-4, and faster than NumPy's
    BLAS, whose threads the workers would otherwise oversubscribe (docs/MODELS.md, "Three runtimes")."""
    if detector.runtime == "numpy":
        from pipeline.models.onnx_trunks import accelerate_in_this_process

        accelerate_in_this_process(detector.model)
    x, geom = fracture_input(img, int(detector.input_spec.get("long_side", 512)))
    seg = detector.engine.forward(x).seg
    return [[px, py] for px, py, _value in seg_peaks(seg, geom, SEG_STRIDE, count, min_distance)]


def inside_box(rec: Record, point: tuple[float, float]) -> bool:
    """Whether ``point`` (original pixels) lies in the record's fracture box (False without a box)."""
    if rec.box is None:
        return False
    x0, y0, x1, y1 = rec.box
    return x0 <= point[0] < x1 and y0 <= point[1] < y1
