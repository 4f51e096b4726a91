import re
from pathlib import Path

import pytest

from pipeline.taxonomy import FRACTURE_TYPES, normalise_type

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fracture-taxonomy.md"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not beside this checkout")
def test_labels_match_the_shared_taxonomy_in_order() -> None:
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`([a-z_]+)`", SHARED.read_text(), flags=re.M)
    assert [(int(i), label) for i, label in rows] == list(enumerate(FRACTURE_TYPES))


@pytest.mark.parametrize(
    ("name", "label"),
    [("Fracture Dislocation", "fracture_dislocation"), ("fracture-dislocation", "fracture_dislocation"),
     ("Compression-Crush", "impacted"), ("Hairline", "hairline"), ("stress", "hairline"),
     ("Oblique fracture", "oblique"), (" TRANSVERSE ", "transverse")],
)
def test_synonyms(name: str, label: str) -> None:
    assert normalise_type(name) == label


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fracture type"):
        normalise_type("broken")
