"""The eleven fracture types, in the order fixed by ``shared/fracture-taxonomy.md``.

The labels are the machine names used by the API, the database, model cards and the Structured Report.
This module is the single in-code copy of that contract; ``tests/test_taxonomy.py`` checks it against the
shared document whenever ``../shared`` is present.
"""

from __future__ import annotations

import re

FRACTURE_TYPES: tuple[str, ...] = (
    "transverse",
    "oblique",
    "spiral",
    "comminuted",
    "greenstick",
    "hairline",
    "impacted",
    "longitudinal",
    "avulsion",
    "pathological",
    "fracture_dislocation",
)

DETECTION_CLASSES: tuple[str, ...] = ("no_fracture", "fracture")

#: Synonyms an importer of other datasets may meet (taxonomy document, last paragraph).
SYNONYMS: dict[str, str] = {
    "fracture-dislocation": "fracture_dislocation",
    "fracture dislocation": "fracture_dislocation",
    "compression-crush": "impacted",
    "compression crush": "impacted",
    "compression": "impacted",
    "hairline": "hairline",
    "stress": "hairline",
    "stress fracture": "hairline",
    "greenstick": "greenstick",
}


def normalise_type(name: str) -> str:
    """Map a dataset's class name onto a taxonomy label, or raise ``ValueError``.

    Case, surrounding whitespace, hyphens/spaces vs underscores and a trailing " fracture" are ignored.
    """
    key = name.strip().lower()
    if key in SYNONYMS:
        return SYNONYMS[key]
    key = re.sub(r"[\s\-]+", "_", key)
    key = re.sub(r"_fractures?$", "", key)
    if key in FRACTURE_TYPES:
        return key
    spaced = key.replace("_", " ")
    if spaced in SYNONYMS:
        return SYNONYMS[spaced]
    raise ValueError(f"unknown fracture type {name!r}; expected one of {', '.join(FRACTURE_TYPES)}")


def type_index(label: str) -> int:
    """Index of a taxonomy label (0..10)."""
    return FRACTURE_TYPES.index(label)
