"""``fracture-node feedback export --out DIR``: clinicians' feedback as a labelled dataset for retraining.

The folder has the synthetic generator's layout (``pipeline.synth.dataset``), so ``fracture-node train`` and
``evaluate`` read it as they read generated data::

    DIR/labels.csv      file,fracture,type,region,laterality,x0,y0,x1,y1,... (one row per labelled image)
    DIR/images/NNNNNN.png  the image as the model sees it (display-ready, bone bright), 16-bit grey

The label of an image is its most recent feedback that says whether a fracture is present (an "agree" on a
yes/no call implies it; an "indeterminate" result needs the clinician to say). The type is the clinician's
correct type (or the model's when they agreed); the box is the model's peak region, kept only when the
clinician agreed that there is a fracture. Provenance columns (result, feedback, user, time, model) follow
the generator's columns; readers of the layout ignore them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np
from sqlalchemy import select

from service.db import Database
from service.models import AnalysisResult, Feedback, Instance, Series, User

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1",
                            "result_id", "feedback_id", "labelled_by", "labelled_at", "agrees", "model",
                            "model_version", "sop_instance_uid")


def _region(body_part: str | None) -> str:
    """DICOM Body Part Examined back to the generator's region name where it is one of them."""
    from pipeline.synth.anatomy import BODY_PART

    if not body_part:
        return ""
    for region, code in BODY_PART.items():
        if code.upper() == body_part.strip().upper():
            return region
    return body_part.strip().lower()


def _image_png16(path: str) -> bytes:
    from dicom.image import radiograph_from_dataset, read_dataset

    pixels = radiograph_from_dataset(read_dataset(path)).pixels
    image = np.rint(np.clip(pixels, 0.0, 1.0) * 65535.0).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def export_feedback(db: Database, out_dir: str | Path) -> dict[str, int]:
    """Write the labelled dataset under ``out_dir``; returns counts (exported, skipped)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    skipped = 0
    with db.session() as session:
        query = (select(Feedback, AnalysisResult, Instance, Series, User.username)
                 .join(AnalysisResult, AnalysisResult.id == Feedback.result_pk)
                 .join(Instance, Instance.id == AnalysisResult.instance_pk)
                 .join(Series, Series.id == Instance.series_pk)
                 .join(User, User.id == Feedback.user_id)
                 .where(Feedback.fracture_present.is_not(None))
                 .order_by(Feedback.id))
        latest: dict[int, tuple[Any, ...]] = {}
        for fb, result, instance, series, username in session.execute(query):
            latest[result.id] = (fb, result, instance, series, username)  # the newest feedback wins
        for result_id in sorted(latest):
            fb, result, instance, series, username = latest[result_id]
            name = f"images/{result_id:06d}.png"
            try:
                (out / name).write_bytes(_image_png16(instance.file_path))
            except (OSError, ValueError) as exc:
                log.warning("result %s: cannot export image (%s); skipped", result_id, exc)
                skipped += 1
                continue
            box: list[Any] = ["", "", "", ""]
            if fb.fracture_present and fb.agrees and result.peak_box and len(result.peak_box) == 4:
                box = [int(v) for v in result.peak_box]
            ftype = (fb.correct_type or "") if fb.fracture_present else ""
            rows.append([name, "1" if fb.fracture_present else "0", ftype, _region(series.body_part),
                         series.laterality or "", *box, result_id, fb.id, username,
                         fb.created_at.isoformat() if fb.created_at else "", "1" if fb.agrees else "0",
                         result.model_name or "", result.model_version or "", instance.sop_instance_uid])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return {"exported": len(rows), "skipped": skipped}


@click.group()
def feedback() -> None:
    """Clinician feedback on results."""


@feedback.command("export")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write labels.csv and images/ to (created if missing).")
def export(out_dir: Path) -> None:
    """Export feedback as a labelled dataset in the synthetic generator's layout (labels.csv + images/)."""
    from service.cli import load_settings

    settings = load_settings()
    db = Database.from_settings(settings)
    try:
        counts = export_feedback(db, out_dir)
    finally:
        db.dispose()
    click.echo(f"exported {counts['exported']} labelled image(s) to {out_dir}"
               + (f" ({counts['skipped']} skipped: image unreadable)" if counts["skipped"] else ""))
