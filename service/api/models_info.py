"""Model cards for ``/api/v1/models``, read from ``model.json`` files without importing torch.

Each bundle is a folder of ``settings.model_dir`` with a ``model.json`` card and a weights file (see
``pipeline.models.bundle``). The bundle is checked as the loader checks it (the card's contract, the weights'
SHA-256: ``verify_bundle``, with the digest of an unchanged file reused) so the answer says whether the bundle
on disk is one the workers would load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.models.bundle import CARD_NAME, DISCLAIMER, BundleError, verify_bundle


def _section(card: dict[str, Any], name: str) -> dict[str, Any]:
    value = card.get(name)
    return value if isinstance(value, dict) else {}


def _card(bundle: Path) -> dict[str, Any]:
    problem = None
    try:
        raw = json.loads((bundle / CARD_NAME).read_text())
        if not isinstance(raw, dict):
            raise ValueError("the card is not a JSON object")
    except (OSError, ValueError) as exc:
        return {"bundle": bundle.name, "name": None, "version": None, "task": None, "status": "invalid",
                "problem": f"{CARD_NAME}: {exc}", "disclaimer": DISCLAIMER}
    card: dict[str, Any] = raw
    expected = _section(card, "weights").get("sha256")
    try:
        verify_bundle(bundle, cached=True)
    except BundleError as exc:
        problem = str(exc)
    operating = _section(card, "operating_point")
    architecture = _section(card, "architecture")
    return {
        "bundle": bundle.name,
        "name": card.get("name"),
        "version": None if card.get("version") is None else str(card.get("version")),
        "task": card.get("task"),
        "classes": card.get("classes") if isinstance(card.get("classes"), list) else [],
        "architecture": architecture.get("class"),
        "weights_sha256": expected,
        "operating_point": operating.get("threshold"),
        "indeterminate_band": operating.get("indeterminate_band"),
        "temperature": card.get("temperature"),
        # A type reader may carry the detection fusion for one detector: the operating point and band the
        # pipeline then uses are the fusion's, not the detector card's (pipeline.run.ModelSet.operating_point).
        "detection_fusion": card.get("detection_fusion") if isinstance(card.get("detection_fusion"), dict) else None,
        "metrics": _section(card, "metrics"),
        "training": _section(card, "training"),
        "intended_use": card.get("intended_use"),
        "created": card.get("created"),
        "status": "ok" if problem is None else "invalid",
        "problem": problem,
        "disclaimer": card.get("disclaimer") or DISCLAIMER,
    }


def read_model_cards(model_dir: Path) -> list[dict[str, Any]]:
    """One entry per bundle folder (a folder holding ``model.json``), sorted by folder name."""
    if not model_dir.is_dir():
        return []
    bundles = [p for p in sorted(model_dir.iterdir()) if p.is_dir() and (p / CARD_NAME).is_file()]
    if (model_dir / CARD_NAME).is_file():
        bundles.insert(0, model_dir)
    return [_card(bundle) for bundle in bundles]
