"""Synthetic radiograph generator (issue 3): 3-D limb anatomy, 3-D fractures, DRR projection, acquisition.

Public API::

    render_sample(seed, *, fracture=None, fracture_type=None, region=None, long_side=None) -> Sample
    display_image(sample) -> float32 [0, 1], bone bright
    render_negative(seed, kind=None, long_side=None) -> Negative     # not-a-bone-radiograph images
    generate_dataset(out_dir, count, seed, fracture_rate=0.5, fmt="png", workers=1, long_side=None,
                     negatives=0, progress=True)

See ``pipeline/synth/README.md``.
"""

from __future__ import annotations

from .anatomy import REGIONS
from .dataset import LABEL_COLUMNS, generate_dataset, item_seed, sample_to_dicom
from .negatives import NEGATIVE_KINDS, Negative, render_negative
from .render import CONFOUNDERS, Sample, display_image, render_sample

__all__ = [
    "CONFOUNDERS",
    "LABEL_COLUMNS",
    "NEGATIVE_KINDS",
    "REGIONS",
    "Negative",
    "Sample",
    "display_image",
    "generate_dataset",
    "item_seed",
    "render_negative",
    "render_sample",
    "sample_to_dicom",
]
