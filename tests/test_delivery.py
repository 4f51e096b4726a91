"""Deliveries: claimed with a lease, sent per destination, retried with backoff, failed for good, sent once."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select, update

from config import Settings
from config.settings import Destination
from dicom.sc import build_secondary_capture
from service import delivery
from service.db import Database
from service.ingest import ingest
from service.models import Artifact, Delivery, Study, utcnow
from tests.conftest import free_port, make_dx_dataset


def seed(settings: Settings, destinations: list[Destination], count: int = 1) -> tuple[Database, list[str]]:
    """Ingest a source radiograph, write ``count`` SCs of it as artifacts and queue their deliveries."""
    from dicom.sr import DetectionCallValues, DeviceIdentity, ImageFindings
    from pipeline.types import ModelIdentity

    settings.ensure_dirs()
    db = Database.from_settings(settings)
    source = make_dx_dataset()
    path = settings.data_dir / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    ingest(db, settings, path.read_bytes(), calling_ae="MODALITY")
    model = ModelIdentity("fn-detector", "1.0", "a" * 64, "detect")
    findings = ImageFindings(fracture_probability=0.8, detection_call=DetectionCallValues.FRACTURE, algorithm=model,
                             models=(model,))
    uids = []
    with db.session() as session:
        study_pk = session.scalar(select(Study.id))
        for i in range(count):
            uid = str(generate_uid())
            sc = build_secondary_capture(source, np.zeros((256, 256, 3), np.uint8), findings,
                                         DeviceIdentity(models=(model,)), series_instance_uid=generate_uid(),
                                         series_number=9901, sop_instance_uid=uid, instance_number=i + 1)
            file = settings.artifact_dir / f"{uid}.dcm"
            sc.save_as(file, enforce_file_format=True)
            artifact = Artifact(study_pk=study_pk, kind="sc", sop_class_uid=sc.SOPClassUID, sop_instance_uid=uid,
                                series_instance_uid=sc.SeriesInstanceUID, file_path=str(file), sha256="0" * 64)
            session.add(artifact)
            session.flush()
            session.add_all(Delivery(artifact_pk=artifact.id, destination=str(d), state="pending")
                            for d in destinations)
            uids.append(uid)
    return db, uids


def states(db: Database) -> dict[str, list[tuple[str, int, int | None]]]:
    with db.session() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        out: dict[str, list[tuple[str, int, int | None]]] = {}
        for row in rows:
            out.setdefault(row.destination, []).append((row.state, row.attempts, row.last_status))
        return out


def make_due(db: Database) -> None:
    with db.session() as session:
        session.execute(update(Delivery).where(Delivery.state == "retrying").values(next_attempt_at=utcnow()))


def test_delivers_once_and_a_down_destination_does_not_block_others(settings: Settings, scp_factory) -> None:  # type: ignore[no-untyped-def]
    pacs = scp_factory([SecondaryCaptureImageStorage])
    down = Destination("DOWN", "127.0.0.1", free_port())  # nothing listens: connection refused
    settings = replace(settings, delivery_max_attempts=2)
    db, uids = seed(settings, [pacs.destination, down], count=3)
    assert delivery.deliver_due(db, settings, "w1") == 3
    assert sorted(pacs.received) == sorted(uids)
    result = states(db)
    assert result[str(pacs.destination)] == [("delivered", 1, 0)] * 3
    assert [s[:2] for s in result[str(down)]] == [("retrying", 1)] * 3
    with db.session() as session:
        errors = session.scalars(select(Delivery.last_error).where(Delivery.destination == str(down))).all()
        next_at = session.scalars(select(Delivery.next_attempt_at).where(Delivery.destination == str(down))).all()
    assert all("DOWN@" in (e or "") for e in errors)
    assert all(t is not None for t in next_at)
    # not due yet: nothing is sent; delivered rows are never sent again
    assert delivery.deliver_due(db, settings, "w1") == 0
    make_due(db)
    assert delivery.deliver_due(db, settings, "w2") == 0
    assert [s[:2] for s in states(db)[str(down)]] == [("failed", 2)] * 3
    assert len(pacs.received) == 3
    # an operator retries the failed ones; the destination is still down, so they come back as retrying
    assert delivery.retry(db, failed=True) == 3
    delivery.deliver_due(db, settings, "w3")
    assert [s[:2] for s in states(db)[str(down)]] == [("retrying", 1)] * 3
    assert len(pacs.received) == 3


def test_refused_sop_class_fails_at_once(settings: Settings, scp_factory) -> None:  # type: ignore[no-untyped-def]
    ct_only = scp_factory([CTImageStorage], ae_title="CTONLY")  # rejects the SC presentation context
    refuses = scp_factory([SecondaryCaptureImageStorage], status=0x0122, ae_title="REFUSER")  # SOP class not supported
    db, _ = seed(settings, [ct_only.destination, refuses.destination])
    assert delivery.deliver_due(db, settings, "w1") == 0
    result = states(db)
    assert result[str(refuses.destination)] == [("failed", 1, 0x0122)]
    assert result[str(ct_only.destination)] == [("failed", 1, None)]
    with db.session() as session:
        error = session.scalar(select(Delivery.last_error).where(Delivery.destination == str(ct_only.destination)))
        status_error = session.scalar(select(Delivery.last_error)
                                      .where(Delivery.destination == str(refuses.destination)))
    assert error is not None and "rejected the presentation context" in error
    assert status_error is not None and "0x0122" in status_error


def test_claims_are_exclusive_and_expired_leases_are_taken_over(settings: Settings) -> None:
    dest = Destination("PACS", "127.0.0.1", free_port())
    db, _ = seed(settings, [dest], count=2)
    first = delivery.claim_due(db, settings, "w1")
    assert len(first) == 2
    assert delivery.claim_due(db, settings, "w2") == []
    with db.session() as session:
        session.execute(update(Delivery).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    second = delivery.claim_due(db, settings, "w2")
    assert len(second) == 2
    # the first owner lost its lease: its late result is not recorded
    from dicom.sender import StoreOutcome

    assert delivery._record(db, settings, "w1", first[0], StoreOutcome(first[0].path, None, 0x0000)) == "lost"
    assert {s[0] for s in states(db)[str(dest)]} == {"sending"}


def test_backoff_grows_and_is_capped() -> None:
    assert [delivery.backoff_seconds(n) for n in (1, 2, 3)] == [5, 10, 20]
    assert delivery.backoff_seconds(30) == 600


def test_cli_lists_and_retries(settings: Settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from service.cli import cli

    dest = Destination("PACS", "127.0.0.1", free_port())
    db, _ = seed(settings, [dest])
    with db.session() as session:
        session.execute(update(Delivery).values(state="failed", attempts=8, last_status=0xA700,
                                                last_error="out of resources"))
    monkeypatch.setenv("FRACTURE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("FRACTURE_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    listed = runner.invoke(cli, ["deliveries", "list", "--state", "failed"])
    assert listed.exit_code == 0, listed.output
    assert "failed" in listed.output and "0xA700" in listed.output and "out of resources" in listed.output
    assert runner.invoke(cli, ["deliveries", "retry"]).exit_code != 0
    retried = runner.invoke(cli, ["deliveries", "retry", "--failed"])
    assert retried.exit_code == 0 and "1 deliveries" in retried.output
    assert states(db)[str(dest)] == [("pending", 0, 0xA700)]
    missing = runner.invoke(cli, ["deliveries", "retry", "999"])
    assert missing.exit_code != 0


def test_files_are_written_where_artifacts_say(settings: Settings) -> None:
    db, uids = seed(settings, [])
    with db.session() as session:
        paths = session.scalars(select(Artifact.file_path)).all()
    assert [Path(p).exists() for p in paths] == [True] * len(uids)
