"""A small, bounded concurrent load on both inputs at once, then two workers on the same queue: every
instance a sender was told was stored is recorded exactly once, has exactly one job, and each job exactly one
result. (The full-size run is ``bench/bench_load.py``.)"""

from __future__ import annotations

import io
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from config import Settings
from dicom.listener import start_listener
from service.auth import create_api_key, create_user
from service.db import Database
from service.models import AnalysisResult, Instance, Job
from service.worker import run_worker

ASSOCIATIONS, PER_ASSOCIATION, UPLOADERS, PER_UPLOADER = 4, 5, 2, 3
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _send(settings: Settings, files: list[Path]) -> set[str]:
    ae = AE(ae_title="LOADTEST")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    stored = set()
    try:
        for path in files:
            ds = dcmread(path)
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                stored.add(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
        ae.shutdown()  # close every socket the requestor opened now, not when the garbage collector gets to it
    return stored


def _upload(app, key: str, files: list[Path]) -> set[str]:  # type: ignore[no-untyped-def]
    client = app.test_client()
    stored = set()
    for path in files:
        response = client.post("/api/v1/studies", headers={"Authorization": f"Bearer {key}"},
                               data={"file": (io.BytesIO(path.read_bytes()), path.name, "application/dicom")},
                               content_type="multipart/form-data")
        assert response.status_code == 202, response.get_data(as_text=True)
        stored.update(item["sop_instance_uid"] for item in response.get_json()["items"])
    return stored


def test_concurrent_associations_and_uploads_lose_and_duplicate_nothing(  # type: ignore[no-untyped-def]
        worker_settings: Settings, db: Database, app, models, make_dicom) -> None:
    settings = worker_settings
    groups = [[make_dicom("DX", rows=96, cols=96, study_instance_uid=f"1.2.826.0.1.3680043.10.9.{a}")
               for _ in range(PER_ASSOCIATION)] for a in range(ASSOCIATIONS)]
    uploads = [[make_dicom("DX", rows=96, cols=96) for _ in range(PER_UPLOADER)] for _ in range(UPLOADERS)]
    with db.session() as session:
        users = [create_user(session, f"loader{i}", f"a long load password {i}") for i in range(2)]
        session.flush()
        keys = [create_api_key(session, users[i % 2], f"load {i}")[1] for i in range(UPLOADERS)]
    server = start_listener(settings, db=db)
    assert server is not None
    try:
        with ThreadPoolExecutor(max_workers=ASSOCIATIONS + UPLOADERS) as pool:
            sent = [pool.submit(_send, settings, files) for files in groups]
            sent += [pool.submit(_upload, app, key, files) for key, files in zip(keys, uploads, strict=True)]
            acknowledged = set().union(*(future.result(timeout=120) for future in sent))
    finally:
        server.shutdown()
    total = ASSOCIATIONS * PER_ASSOCIATION + UPLOADERS * PER_UPLOADER
    assert len(acknowledged) == total
    with db.session() as session:
        recorded = Counter(session.scalars(select(Instance.sop_instance_uid)))
        jobs = Counter(session.scalars(select(Job.instance_pk)))
    assert set(recorded) == acknowledged and set(recorded.values()) == {1}  # 0 lost, 0 duplicated
    assert len(jobs) == total and set(jobs.values()) == {1}
    # Two workers drain the queue together: every job is processed exactly once.
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = [pool.submit(run_worker, settings, stop, db=db, models=models, exit_when_idle=True,
                            owner=f"load-worker-{i}") for i in range(2)]
        processed = sum(future.result(timeout=300) for future in done)
    assert processed == total
    with db.session() as session:
        states = Counter(session.scalars(select(Job.state)))
        results = Counter(session.scalars(select(AnalysisResult.job_pk)))
    assert states == {"done": total}
    assert len(results) == total and set(results.values()) == {1}


def test_twenty_simultaneous_associations_are_all_accepted(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    """The issue's load is 20 simultaneous associations (the listener once refused the 17th: F8, fixed by the
    ``FRACTURE_MAX_ASSOCIATIONS`` setting, default 32)."""
    files = [make_dicom("DX", rows=64, cols=64) for _ in range(20)]
    server = start_listener(settings, db=db)
    assert server is not None
    associations = []
    try:
        for _ in range(20):
            ae = AE(ae_title="LOADTEST")
            ae.add_requested_context(DX, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.network_timeout = 30
            associations.append(ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title))
        established = [a for a in associations if a.is_established]
        statuses = [a.send_c_store(dcmread(f)).Status for a, f in zip(established, files, strict=False)]
    finally:
        for assoc in associations:
            if assoc.is_established:
                assoc.release()
        server.shutdown()
    assert len(established) == 20, f"only {len(established)} of 20 simultaneous associations were accepted"
    assert statuses == [0x0000] * 20
