"""Radiograph check: rules with readable reasons, and (with the bundled model) the learned classifier."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.models.bundle import load_bundle
from pipeline.models.imageio import radiograph_from_array
from pipeline.run import BUNDLED_MODEL_DIR
from pipeline.training.toydata import toy_radiograph
from pipeline.types import Radiograph
from pipeline.validation import RadiographCheck, check_rules

HAS_BUNDLE = (BUNDLED_MODEL_DIR / "validity" / "model.json").exists()


def _toy() -> np.ndarray:
    img, _m, _b = toy_radiograph(np.random.default_rng(0), False, 0, h=256, w=192)
    return img


def test_grey_radiograph_passes_rules() -> None:
    finding = check_rules(Radiograph(pixels=_toy()))
    assert finding.ok, finding.reason


def test_grey_stored_as_rgb_passes_colour_rule() -> None:
    grey = (_toy() * 255).astype(np.uint8)
    rad = radiograph_from_array(np.stack([grey] * 3, axis=-1))
    assert rad.rgb is not None
    assert check_rules(rad).ok


@pytest.mark.parametrize(
    ("radiograph", "reason"),
    [
        (radiograph_from_array(np.dstack([np.full((200, 200), c, np.uint8) for c in (220, 40, 30)])), "colour"),
        (Radiograph(pixels=np.random.default_rng(0).random((40, 40)).astype(np.float32)), "too small"),
        (Radiograph(pixels=np.random.default_rng(0).random((100, 900)).astype(np.float32)), "aspect"),
        (Radiograph(pixels=np.full((300, 300), 0.5, np.float32)), "blank or flat"),
        (Radiograph(pixels=(np.random.default_rng(0).random((300, 300)) > 0.5).astype(np.float32)), "grey levels"),
    ],
)
def test_rules_refuse_with_reason(radiograph: Radiograph, reason: str) -> None:
    result = RadiographCheck(None)(radiograph)
    assert result.verdict == "not_radiograph"
    assert reason in result.reason
    assert result.score == 0.0


@pytest.mark.skipif(not HAS_BUNDLE, reason="no bundled validity model")
def test_bundled_check_on_generated_images() -> None:
    synth = pytest.importorskip("pipeline.synth")
    check = RadiographCheck(load_bundle(BUNDLED_MODEL_DIR / "validity"))
    sample = synth.render_sample(123, long_side=640)
    shown = synth.display_image(sample)
    result = check(Radiograph(pixels=shown))
    assert result.is_radiograph, result.reason
    assert result.model is not None and result.model.sha256
    # An 8-bit greyscale JPEG of a radiograph must pass too.
    ok, enc = cv2.imencode(".jpg", (shown * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    jpeg = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)
    assert check(radiograph_from_array(jpeg)).is_radiograph
    refused = 0
    for i, kind in enumerate(synth.NEGATIVE_KINDS):
        neg = synth.render_negative(1000 + i, kind=kind, long_side=512)
        refused += not check(radiograph_from_array(neg.image)).is_radiograph
    assert refused >= len(synth.NEGATIVE_KINDS) - 1
