"""Contact sheet of the generator: every fracture type (whole image + zoom), confounders, negatives.

    .venv/bin/python -m pipeline.synth.sheet docs/synth_contact_sheet.png
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from pipeline.taxonomy import FRACTURE_TYPES

from .negatives import NEGATIVE_KINDS, render_negative
from .render import CONFOUNDERS, display_image, render_sample

TILE = 232
#: (seed, region) per type for the sheet: varied regions, mostly clearly visible examples
SHOWCASE: dict[str, tuple[int, str]] = {
    "transverse": (3001, "forearm"),
    "oblique": (3002, "lower_leg"),
    "spiral": (3003, "femur"),
    "comminuted": (3004, "lower_leg"),
    "greenstick": (3005, "forearm"),
    "hairline": (3006, "humerus"),
    "impacted": (3007, "femur"),
    "longitudinal": (3008, "lower_leg"),
    "avulsion": (3009, "lower_leg"),
    "pathological": (3010, "humerus"),
    "fracture_dislocation": (3011, "hand"),
}
LONG = 1024


def _label(img: np.ndarray, text: str, sub: str = "") -> np.ndarray:
    cv2.rectangle(img, (0, 0), (TILE - 1, 15), (0, 0, 0), -1)
    cv2.putText(img, text, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (80, 230, 255), 1, cv2.LINE_AA)
    if sub:
        cv2.rectangle(img, (0, TILE - 14), (TILE - 1, TILE - 1), (0, 0, 0), -1)
        cv2.putText(img, sub, (3, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.32, (200, 200, 200), 1, cv2.LINE_AA)
    return img


def _fit(gray: np.ndarray) -> tuple[np.ndarray, float, int, int]:
    h, w = gray.shape[:2]
    sc = TILE / max(h, w)
    small = cv2.resize(gray, (max(int(w * sc), 1), max(int(h * sc), 1)), interpolation=cv2.INTER_AREA)
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    oy, ox = (TILE - small.shape[0]) // 2, (TILE - small.shape[1]) // 2
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    tile[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return tile, sc, ox, oy


def _whole(s, text: str) -> np.ndarray:
    d = (display_image(s) * 255).astype(np.uint8)
    tile, sc, ox, oy = _fit(d)
    if s.box is not None:
        x0, y0, x1, y1 = s.box
        p0 = (int(x0 * sc) + ox - 2, int(y0 * sc) + oy - 2)
        p1 = (int(x1 * sc) + ox + 2, int(y1 * sc) + oy + 2)
        cv2.rectangle(tile, p0, p1, (0, 0, 255), 1)
    sub = f"{s.region} {s.laterality} {s.photometric[-1]} {s.bits_stored}b {s.image.shape[1]}x{s.image.shape[0]}"
    return _label(tile, text, sub)


def _zoom(s, text: str) -> np.ndarray:
    d = (display_image(s) * 255).astype(np.uint8)
    x0, y0, x1, y1 = s.box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    r = int(max(x1 - x0, y1 - y0) * 0.75) + 24
    pad = np.pad(d, r, mode="constant")
    crop: np.ndarray = pad[cy:cy + 2 * r, cx:cx + 2 * r]
    crop = cv2.resize(crop, (TILE, TILE), interpolation=cv2.INTER_AREA if 2 * r > TILE else cv2.INTER_CUBIC)
    tile = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    return _label(tile, text + " (zoom)", f"bone: {s.fractured_bone}")


def _find(pred, start: int, **kw):
    for seed in range(start, start + 400):
        s = render_sample(seed, long_side=LONG, **kw)
        if pred(s):
            return s
    raise RuntimeError("no sample found")


def make_sheet(path: str, cols: int = 8) -> None:
    tiles: list[np.ndarray] = []
    for k, ft in enumerate(FRACTURE_TYPES):
        seed, region = SHOWCASE.get(ft, (3000 + 17 * k, None))
        s = render_sample(seed, fracture_type=ft, region=region, long_side=LONG)
        tiles += [_whole(s, f"{k} {ft}"), _zoom(s, ft)]
    for k in range(2):
        tiles.append(_whole(render_sample(4000 + k, fracture=False, long_side=LONG), "normal"))
    for k, c in enumerate(CONFOUNDERS):
        s = _find(lambda s, c=c: c in s.confounders and (c != "overlapping_bones" or s.region == "forearm"),
                  5000 + 50 * k, fracture=False)
        tiles.append(_whole(s, f"confounder: {c} (normal)"))
    for k, kind in enumerate(NEGATIVE_KINDS):
        n = render_negative(6000 + k, kind=kind, long_side=512)
        img = n.image if n.image.ndim == 2 else cv2.cvtColor(n.image, cv2.COLOR_RGB2BGR)
        tile, *_ = _fit(img)
        tiles.append(_label(tile, f"negative: {kind}"))
    # the same seed with and without a fracture: identical patient, positioning and exposure
    for k, ft in enumerate(("oblique", "spiral", "pathological")):
        frac = render_sample(7000 + k, fracture_type=ft, region="forearm", long_side=LONG)
        norm = render_sample(7000 + k, fracture=False, region="forearm", long_side=LONG)
        norm.box = frac.box
        norm.fractured_bone = frac.fractured_bone
        tiles += [_zoom(norm, f"seed {7000 + k} normal"), _zoom(frac, f"seed {7000 + k} {ft}")]
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (TILE + 4), cols * (TILE + 4), 3), 40, np.uint8)
    for i, tl in enumerate(tiles):
        ri, ci = divmod(i, cols)
        sheet[ri * (TILE + 4):ri * (TILE + 4) + TILE, ci * (TILE + 4):ci * (TILE + 4) + TILE] = tl
    cv2.imwrite(path, sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    make_sheet(sys.argv[1] if len(sys.argv) > 1 else "docs/synth_contact_sheet.png")
