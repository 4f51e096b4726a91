"""Study reporting: quiet, analysed studies get one SC per image and one SR, with their deliveries queued."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select, update

from config import Settings
from config.settings import Destination
from dicom.sr_parse import parse_report
from service import reporting
from service.db import Database
from service.models import Artifact, Delivery, Job, Study
from tests.conftest import add_analysed_image

add_image = add_analysed_image


def test_reports_a_quiet_study_once_and_again_after_a_new_image(settings: Settings, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    pacs, other = Destination("PACS", "127.0.0.1", 4242), Destination("MODALITY", "127.0.0.1", 4243)
    settings = replace(settings, destinations=(pacs, other))
    settings.ensure_dirs()
    db = Database.from_settings(settings)
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    first = add_image(db, settings, study_uid)
    add_image(db, settings, study_uid, radiograph=False)  # rejected by validity: in neither SC nor SR

    assert reporting.report_quiet_studies(db, settings) == 1
    assert reporting.report_quiet_studies(db, settings) == 0
    with db.session() as session:
        assert session.scalar(select(Study.report_state)) == "reported"
        artifacts = session.scalars(select(Artifact).order_by(Artifact.id)).all()
        deliveries = session.scalars(select(Delivery)).all()
    assert [a.kind for a in artifacts] == ["sc", "gsps", "sr"]
    assert len(deliveries) == 6 and {d.destination for d in deliveries} == {str(pacs), str(other)}
    for artifact in artifacts:
        path = Path(artifact.file_path)
        assert path.parent == settings.artifact_dir / study_uid and path.exists()
        ds = dcmread(path)
        assert ds.StudyInstanceUID == study_uid and ds.SOPInstanceUID == artifact.sop_instance_uid
        assert ds.SeriesInstanceUID == artifact.series_instance_uid
        assert dciodvfy(path) == [], artifact.kind
    report = parse_report(dcmread(artifacts[2].file_path))
    assert [f.referenced_sop_instance_uid for f in report.images] == [first]
    assert report.images[0].top_type == "spiral" and report.images[0].peak_box == (30, 40, 90, 120)

    # a new image arrives (ingestion resets the study to pending): a new SR and an SC for the new image only
    second = add_image(db, settings, study_uid)
    with db.session() as session:
        assert session.scalar(select(Study.report_state)) == "pending"
    assert reporting.report_quiet_studies(db, settings) == 1
    with db.session() as session:
        artifacts = session.scalars(select(Artifact).order_by(Artifact.id)).all()
        deliveries = session.scalars(select(Delivery)).all()
    assert [a.kind for a in artifacts] == ["sc", "gsps", "sr", "sc", "gsps", "sr"]
    assert len(deliveries) == 12
    assert artifacts[3].series_instance_uid == artifacts[0].series_instance_uid  # same SC series
    newest = parse_report(dcmread(artifacts[5].file_path))
    assert sorted(f.referenced_sop_instance_uid or "" for f in newest.images) == sorted([first, second])
    assert dcmread(artifacts[5].file_path).InstanceNumber == 2


def test_waits_for_unfinished_jobs_and_the_quiet_period(settings: Settings) -> None:
    settings.ensure_dirs()
    db = Database.from_settings(settings)
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.2")
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.2", job_state="processing")
    assert reporting.report_quiet_studies(db, settings) == 0
    assert reporting.report_quiet_studies(db, replace(settings, study_quiet_seconds=3600)) == 0
    with db.session() as session:
        session.execute(update(Job).values(state="rejected").where(Job.state == "processing"))
    assert reporting.report_quiet_studies(db, replace(settings, study_quiet_seconds=3600)) == 0
    assert reporting.report_quiet_studies(db, settings) == 1


def test_a_study_is_claimed_once(settings: Settings) -> None:
    settings.ensure_dirs()
    db = Database.from_settings(settings)
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.3")
    with db.session() as session:
        study_id = session.scalar(select(Study.id))
    assert reporting._claim(db, study_id) is True
    assert reporting._claim(db, study_id) is False
    assert reporting.report_quiet_studies(db, settings) == 0  # it is 'reporting', not 'pending'


def test_only_rejected_images_are_not_reported(settings: Settings) -> None:
    settings.ensure_dirs()
    db = Database.from_settings(settings)
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.4", job_state="rejected")
    assert reporting.report_quiet_studies(db, settings) == 0


def test_return_to_sender_sends_only_to_the_calling_node(settings: Settings) -> None:
    modality, pacs = Destination("MODALITY", "127.0.0.1", 4243), Destination("PACS", "127.0.0.1", 4242)
    settings = replace(settings, destinations=(pacs, modality), return_to_sender=True)
    db = Database.from_settings(settings)
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.7")  # sent by calling AE "MODALITY"
    assert reporting.report_quiet_studies(db, settings) == 1
    with db.session() as session:
        assert set(session.scalars(select(Delivery.destination))) == {str(modality)}
    db.dispose()


def test_uploaded_studies_are_reported_but_not_sent_to_pacs(settings: Settings) -> None:
    settings = replace(settings, destinations=(Destination("PACS", "127.0.0.1", 4242),))
    db = Database.from_settings(settings)
    add_image(db, settings, "1.2.826.0.1.3680043.8.498.8")
    with db.session() as session:
        session.execute(update(Study).values(source="upload"))
    assert reporting.report_quiet_studies(db, settings) == 1
    with db.session() as session:
        assert session.scalars(select(Artifact.kind)).all()  # SC and SR exist for the portal and API
        assert session.scalars(select(Delivery)).all() == []
    db.dispose()
