"""``fracture-node feedback export``: clinicians' feedback becomes a dataset in the generator's layout that the
training code reads back."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from service.cli import cli
from service.feedback_cli import COLUMNS, export_feedback
from service.models import Feedback, utcnow
from tests.test_portal_support import Portal


def _feedback(p: Portal, key: str, user: str, **fields: object) -> None:
    with p.db.session() as s:
        s.add(Feedback(result_pk=p.results[key], user_id=p.users[user], created_at=utcnow(), **fields))


def test_export_writes_labels_and_images_that_training_reads(app, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = Portal(app, app.extensions["fracture.db"], settings, tmp_path)
    p.add_user("ruth", "clinician", "Referrer^Ruth")
    for key, part in (("a", "FOREARM"), ("b", "HAND"), ("c", "FEMUR")):
        p.ingest(key, uploaded_by="ruth", BodyPartExamined=part, Laterality="L")
        p.finish(key, call="fracture" if key != "c" else "indeterminate")
    _feedback(p, "a", "ruth", agrees=True, fracture_present=True, correct_type="greenstick")
    _feedback(p, "b", "ruth", agrees=True, fracture_present=True, correct_type="greenstick")
    _feedback(p, "b", "ruth", agrees=False, fracture_present=False, correct_type=None)  # the newest wins
    _feedback(p, "c", "ruth", agrees=False, fracture_present=None, correct_type=None)  # says nothing: skipped

    out = tmp_path / "export"
    assert export_feedback(p.db, out) == {"exported": 2, "skipped": 0}
    with open(out / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        assert COLUMNS[:9] == ("file", "fracture", "type", "region", "laterality", "x0", "y0", "x1", "y1")
        rows = {row["result_id"]: row for row in reader}
    a, b = rows[str(p.results["a"])], rows[str(p.results["b"])]
    assert (a["fracture"], a["type"], a["region"], a["laterality"]) == ("1", "greenstick", "forearm", "L")
    assert [a[k] for k in ("x0", "y0", "x1", "y1")] == ["4", "5", "20", "24"]  # the model's box, agreed
    assert (b["fracture"], b["type"], b["region"], b["x0"], b["labelled_by"]) == ("0", "", "hand", "", "ruth")
    image = cv2.imread(str(out / a["file"]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16 and image.shape == (64, 64)

    from pipeline.training.datasets import read_generator_layout

    records = {r.path.name: r for r in read_generator_layout(out)}
    assert records[Path(a["file"]).name].fracture is True and records[Path(a["file"]).name].type == "greenstick"
    assert records[Path(a["file"]).name].box == (4, 5, 20, 24)
    assert records[Path(b["file"]).name].fracture is False


def test_cli_command(app, settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FRACTURE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FRACTURE_DATABASE_URL", settings.database_url)
    result = CliRunner().invoke(cli, ["feedback", "export", "--out", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert "exported 0 labelled image(s)" in result.output
    assert (tmp_path / "empty" / "labels.csv").read_text().startswith("file,fracture,type,region,laterality,x0")
