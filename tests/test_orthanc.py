"""Orthanc as the PACS: our SC and SR arrive in the right study with the right references and findings,
deliveries survive Orthanc being down, and the whole path storescu -> FractureNode -> Orthanc works."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from config import Settings
from dicom.sc import build_secondary_capture
from dicom.sender import StoreSCU
from dicom.sr import build_structured_report
from dicom.sr_parse import parse_report
from service import delivery, reporting
from service.db import Database
from service.models import Delivery, utcnow
from tests.conftest import add_analysed_image
from tests.orthanc import OrthancServer

pytestmark = pytest.mark.orthanc

SC_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def _instances_by_class(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    studies = [s for s in orthanc.get("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]
    assert len(studies) == 1, f"expected exactly one study {study_uid} in Orthanc"
    out: dict[str, list[str]] = {}
    for instance in orthanc.get(f"/studies/{studies[0]['ID']}/instances"):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        out.setdefault(tags["SOPClassUID"], []).append(instance["ID"])
    return out


def test_sc_and_sr_arrive_in_the_source_study(orthanc: OrthancServer, tmp_path: Path, dx_source,  # type: ignore[no-untyped-def]
                                              fracture_findings, device) -> None:
    files = {"source": tmp_path / "source.dcm", "sc": tmp_path / "sc.dcm", "sr": tmp_path / "sr.dcm"}
    dx_source.save_as(files["source"], enforce_file_format=True)
    build_secondary_capture(dx_source, np.full((256, 256, 3), 80, np.uint8), fracture_findings, device,
                            series_instance_uid=generate_uid(), series_number=9901, sop_instance_uid=generate_uid(),
                            instance_number=1).save_as(files["sc"], enforce_file_format=True)
    build_structured_report([(dx_source, fracture_findings)], device, series_instance_uid=generate_uid(),
                            series_number=9902, sop_instance_uid=generate_uid()).save_as(files["sr"],
                                                                                         enforce_file_format=True)
    outcomes = StoreSCU("FRACTURENODE", orthanc.destination).send(list(files.values()))
    assert [o.status for o in outcomes] == [0, 0, 0], [o.error for o in outcomes]

    by_class = _instances_by_class(orthanc, dx_source.StudyInstanceUID)
    assert len(by_class[SC_CLASS]) == 1 and len(by_class[SR_CLASS]) == 1
    sc_tags = orthanc.get(f"/instances/{by_class[SC_CLASS][0]}/tags?simplify")
    assert sc_tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] == dx_source.SOPInstanceUID
    assert sc_tags["PatientID"] == dx_source.PatientID and "NOT FOR DIAGNOSTIC USE" in sc_tags["SeriesDescription"]
    sr = dcmread(DicomBytesIO(orthanc.file(by_class[SR_CLASS][0])))
    parsed = parse_report(sr)
    assert parsed.images == [replace(fracture_findings, referenced_sop_instance_uid=dx_source.SOPInstanceUID)]


def test_deliveries_wait_for_a_pacs_that_is_down(settings: Settings, orthanc: OrthancServer) -> None:
    settings = replace(settings, destinations=(orthanc.destination,))
    db = Database.from_settings(settings)
    study_uid = str(generate_uid())
    add_analysed_image(db, settings, study_uid)
    assert reporting.report_quiet_studies(db, settings) == 1

    orthanc.stop()
    assert delivery.deliver_due(db, settings, "w1") == 0
    with db.session() as session:
        assert set(session.scalars(select(Delivery.state))) == {"retrying"}
        session.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))
    orthanc.start()
    assert delivery.deliver_due(db, settings, "w1") == 3
    by_class = _instances_by_class(orthanc, study_uid)
    assert len(by_class[SC_CLASS]) == 1 and len(by_class[SR_CLASS]) == 1 and len(by_class[GSPS_CLASS]) == 1
    # a restarted node (new process, new database handle) sends nothing again
    db.dispose()
    db = Database.from_settings(settings)
    assert delivery.deliver_due(db, settings, "w2") == 0
    with db.session() as session:
        assert set(session.execute(select(Delivery.state, Delivery.attempts)).all()) == {("delivered", 2)}
    assert orthanc.get("/statistics")["CountInstances"] == 3  # SC + GSPS + SR, each once
    db.dispose()


def _require_storescu() -> None:
    if shutil.which("storescu") is None:
        if os.environ.get("CI"):
            pytest.fail("storescu (Debian package dcmtk) is required in CI")
        pytest.skip("storescu not installed (apt-get install dcmtk)")


@pytest.mark.dcmtk
@pytest.mark.slow
def test_storescu_to_fracturenode_to_orthanc(worker_settings: Settings, orthanc: OrthancServer, models,  # type: ignore[no-untyped-def]
                                              make_dicom) -> None:
    from dicom.listener import start_listener
    from service.worker import run_worker

    _require_storescu()
    settings = replace(worker_settings, destinations=(orthanc.destination,))
    db = Database.from_settings(settings)
    study_uid = str(generate_uid())
    paths = [make_dicom("DX", study_instance_uid=study_uid, seed=i) for i in range(2)]
    server = start_listener(settings, db=db)
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(settings, stop),
                              kwargs={"db": db, "models": models, "poll_interval": 0.2}, daemon=True)
    try:
        sent = subprocess.run(["storescu", "-aec", settings.ae_title, "-aet", "MODALITY", "127.0.0.1",
                               str(settings.dicom_port), *map(str, paths)],
                              env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        worker.start()
        deadline = time.monotonic() + 90
        by_class: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            try:
                by_class = _instances_by_class(orthanc, study_uid)
            except AssertionError:
                by_class = {}
            if by_class.get(SR_CLASS) and len(by_class.get(SC_CLASS, [])) == 2:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(timeout=60)
        assert server is not None
        server.shutdown()
    assert len(by_class.get(SC_CLASS, [])) == 2 and len(by_class.get(SR_CLASS, [])) == 1, by_class
    sources = {dcmread(p).SOPInstanceUID for p in paths}
    referenced = {orthanc.get(f"/instances/{i}/tags?simplify")["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
                  for i in by_class[SC_CLASS]}
    assert referenced == sources
    report = parse_report(dcmread(DicomBytesIO(orthanc.file(by_class[SR_CLASS][0]))))
    assert {f.referenced_sop_instance_uid for f in report.images} == sources
    assert report.verification_flag == "UNVERIFIED" and report.completion_flag == "COMPLETE"
    db.dispose()
