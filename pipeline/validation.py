"""Radiograph check: is this image a bone radiograph at all?

Cheap rules run first and give a precise human-readable reason (colour, tiny size, extreme aspect, blank or
flat image, too few grey levels). An image that passes them is scored by a small learned classifier
(:class:`~pipeline.models.nets.ValidityNet`, trained on generated radiographs against every kind of
generated negative). The verdict, a score in [0, 1] ("how radiograph-like") and the reason come back as a
:class:`~pipeline.types.ValidityResult` carrying the model's identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.models.bundle import Bundle
from pipeline.models.preprocess import resize_long_side, validity_input
from pipeline.types import Radiograph, ValidityResult

MIN_SIDE = 64
MAX_ASPECT = 5.0
MAX_MEAN_SATURATION = 0.10  # HSV saturation in [0, 1]; grey images stored as RGB have ~0
MIN_STD = 0.015
MIN_RANGE = 0.06  # p99.5 - p0.5
MIN_LEVELS = 12


@dataclass(frozen=True)
class RuleFinding:
    ok: bool
    reason: str


def check_rules(radiograph: Radiograph) -> RuleFinding:
    """The rule stage alone."""
    px = radiograph.pixels
    if px.ndim != 2 or px.size == 0:
        return RuleFinding(False, f"not a 2-D image (shape {px.shape})")
    h, w = px.shape
    if min(h, w) < MIN_SIDE:
        return RuleFinding(False, f"image too small ({w}x{h} px; at least {MIN_SIDE} px a side is needed)")
    aspect = max(h, w) / min(h, w)
    if aspect > MAX_ASPECT:
        return RuleFinding(False, f"extreme aspect ratio {aspect:.1f}:1 (a radiograph is at most {MAX_ASPECT:.0f}:1)")
    if radiograph.rgb is not None:
        rgb = radiograph.rgb
        small = resize_long_side(rgb, 256) if max(rgb.shape[:2]) > 256 else rgb
        hsv = cv2.cvtColor(np.ascontiguousarray(small[..., :3], dtype=np.uint8), cv2.COLOR_RGB2HSV)
        sat = float(hsv[..., 1].mean()) / 255.0
        if sat > MAX_MEAN_SATURATION:
            return RuleFinding(False, f"colour image (mean saturation {sat:.2f}); radiographs are greyscale")
    small_px = resize_long_side(px, 256) if max(h, w) > 256 else px
    std = float(small_px.std())
    lo, hi = np.percentile(small_px, [0.5, 99.5])
    if std < MIN_STD or hi - lo < MIN_RANGE:
        return RuleFinding(False, f"blank or flat image (contrast range {hi - lo:.3f}, std {std:.3f})")
    step = max(1, max(h, w) // 256)  # nearest subsampling: resampling would invent grey levels
    levels = len(np.unique(np.round(px[::step, ::step] * 255).astype(np.uint8)))
    if levels < MIN_LEVELS:
        return RuleFinding(False, f"only {levels} grey levels: line art or a binary image, not a radiograph")
    return RuleFinding(True, "passed the rule checks (greyscale, size, aspect, contrast)")


class RadiographCheck:
    """Rules + learned classifier. ``bundle`` may be ``None`` (rules only, e.g. in tests)."""

    def __init__(self, bundle: Bundle | None) -> None:
        self.bundle = bundle
        self.size = int(bundle.input_spec.get("size", 160)) if bundle else 160
        self.threshold = bundle.operating_point if bundle else 0.5
        self.temperature = bundle.temperature if bundle else 1.0

    def score(self, radiograph: Radiograph) -> float:
        if self.bundle is None:
            return 1.0
        logit = self.bundle.engine.logit(validity_input(radiograph.pixels, self.size)) / self.temperature
        return float(1.0 / (1.0 + np.exp(-logit)))

    def __call__(self, radiograph: Radiograph) -> ValidityResult:
        identity = self.bundle.identity if self.bundle else None
        rules = check_rules(radiograph)
        if not rules.ok:
            return ValidityResult("not_radiograph", 0.0, rules.reason, identity)
        p = self.score(radiograph)
        if p >= self.threshold:
            return ValidityResult("radiograph", p, f"looks like a bone radiograph (learned check score {p:.2f})",
                                  identity)
        return ValidityResult(
            "not_radiograph", p,
            f"does not look like a bone radiograph (learned check score {p:.2f} < {self.threshold:.2f})", identity,
        )
