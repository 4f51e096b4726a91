"""Acquisition shifts (pipeline/evaluation/shifts.py): each keeps the image a [0, 1] radiograph, is the same on
every run, changes the pixels, and carries the fracture box to where the fracture is in the new image."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.shifts import SHIFTS, get_shift, shift_rng


def _image_with_a_mark() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A smooth limb-like gradient with one bright 40 x 30 mark whose box is known."""
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.15 + 0.5 * np.exp(-((xx - 150) / 60) ** 2) + 0.05 * yy / h
    box = (120, 200, 150, 240)  # x0, y0, x1, y1
    img[box[1]:box[3], box[0]:box[2]] = 1.0
    return np.clip(img, 0, 1).astype(np.float32), box


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shift_keeps_a_unit_image_is_deterministic_and_moves_the_box_with_the_mark(name: str) -> None:
    img, box = _image_with_a_mark()
    shift = get_shift(name)
    out, new_box = shift.apply(img.copy(), box, shift_rng(3, name))
    again, again_box = shift.apply(img.copy(), box, shift_rng(3, name))
    assert out.ndim == 2 and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, again)
    assert new_box == again_box and new_box is not None
    if name == "none":
        np.testing.assert_array_equal(out, img)
        assert new_box == box
        return
    assert out.shape != img.shape or float(np.abs(out - img).max()) > 0.01, name
    x0, y0, x1, y1 = new_box
    assert 0 <= x0 < x1 <= out.shape[1] and 0 <= y0 < y1 <= out.shape[0]
    # The mark is still the brightest thing inside its box after every shift but the darkening tone curve
    # (which keeps 1.0 at 1.0 too): the mean over the mapped box beats the mean of the whole image.
    inner = out[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert float(inner.mean()) > float(out.mean()) + 0.1, name


def test_geometric_shifts_scale_and_offset_the_box() -> None:
    img, box = _image_with_a_mark()
    _, zoomed = get_shift("zoom_out").apply(img, box, shift_rng(0, "zoom_out"))
    h, w = img.shape
    left, top = (round(w * 1.5) - w) // 2, (round(h * 1.5) - h) // 2
    assert zoomed == (box[0] + left, box[1] + top, box[2] + left, box[3] + top)
    out, small = get_shift("small_jpeg").apply(img, box, shift_rng(0, "small_jpeg"))
    assert max(out.shape) == 640 and small == (192, 320, 240, 384)  # 400 px -> 640 px: x 1.6


def test_noise_differs_between_images_but_not_between_runs() -> None:
    img, box = _image_with_a_mark()
    noise = get_shift("noise")
    a, _ = noise.apply(img, box, shift_rng(0, "noise"))
    b, _ = noise.apply(img, box, shift_rng(1, "noise"))
    assert float(np.abs(a - b).mean()) > 1e-3


def test_unknown_shift_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: none, gamma_0.4"):
        get_shift("sepia")
