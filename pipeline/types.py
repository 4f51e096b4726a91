"""Plain data passed between pipeline stages.

Both inputs (the DICOM listener and HTTP uploads) end in :func:`pipeline.run.analyze`, which takes a
:class:`Radiograph` and returns an :class:`Analysis`. Nothing here depends on Flask, the database or the
network, so every stage can be used and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Verdict = Literal["radiograph", "not_radiograph"]
DetectionCall = Literal["fracture", "no_fracture", "indeterminate"]


@dataclass(frozen=True)
class Radiograph:
    """A decoded image ready for the models.

    ``pixels`` is a 2-D float32 array in [0, 1] where *bright means dense* (bone is bright), i.e. the
    MONOCHROME2 convention after Modality LUT, VOI windowing and MONOCHROME1 inversion. Colour inputs are
    kept in ``rgb`` (uint8, HxWx3) so the validity stage can refuse them.
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None
    rgb: np.ndarray | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    photometric_interpretation: str | None = None
    body_part: str | None = None
    laterality: str | None = None
    source: str = "unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model bundle produced an output (IHE AI Results: contributing equipment)."""

    name: str
    version: str
    sha256: str
    task: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ValidityResult:
    verdict: Verdict
    score: float
    reason: str
    model: ModelIdentity | None = None

    @property
    def is_radiograph(self) -> bool:
        return self.verdict == "radiograph"


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in original image pixel coordinates (x right, y down), inclusive-exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class DetectionResult:
    probability: float
    operating_point: float
    call: DetectionCall
    model: ModelIdentity
    verified_by: ModelIdentity | None = None  # the type reader whose evidence was fused into the probability


@dataclass(frozen=True)
class ClassificationResult:
    distribution: dict[str, float]
    top_type: str
    top_probability: float
    model: ModelIdentity


@dataclass
class Explanation:
    """Explanation images, all at the original image's geometry.

    ``heatmap`` is float32 in [0, 1]; ``edges`` uint8 {0, 255}; ``hybrid`` uint8 RGB overlay of both on the
    original; ``peak_box`` the heatmap's peak region.
    """

    heatmap: np.ndarray
    edges: np.ndarray
    hybrid: np.ndarray
    peak_box: Box | None


@dataclass
class Analysis:
    """Everything the pipeline concluded about one image."""

    validity: ValidityResult
    detection: DetectionResult | None = None
    classification: ClassificationResult | None = None
    explanation: Explanation | None = None
    models: list[ModelIdentity] = field(default_factory=list)
    disclaimer: str = "Research use only. Not for diagnostic use."
