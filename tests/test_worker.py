"""service.worker: real models, real databases, real worker processes (SIGKILL, SIGTERM)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from config import Settings
from dicom.listener import start_listener
from service.db import Database, upgrade
from service.ingest import ingest
from service.models import AnalysisResult, Instance, Job, JobEvent
from service.worker import run_worker
from tests.conftest import free_port


def _job_for(db: Database, instance_pk: int) -> Job:
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.instance_pk == instance_pk)).one()
        return job


def _results(db: Database, instance_pk: int) -> list[AnalysisResult]:
    with db.session() as session:
        return list(session.scalars(select(AnalysisResult).where(AnalysisResult.instance_pk == instance_pk)))


def _send(settings: Settings, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    for path in paths:
        ae.add_requested_context(dcmread(path, stop_before_pixels=True).SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
    assoc.release()
    return statuses


def test_worker_analyses_radiographs_and_rejects_the_rest(worker_settings: Settings, db: Database, models,  # type: ignore[no-untyped-def]
                                                          make_dicom) -> None:
    settings = worker_settings
    dx = make_dicom("DX")
    cr = make_dicom("CR", photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=0, WindowCenter=2000,
                    WindowWidth=4000)
    ct, mr = make_dicom("CT"), make_dicom("MR")
    corrupt = make_dicom("DX", pixel_bytes=b"\x00\x01" * 1000)  # far fewer bytes than Rows x Columns
    flat = make_dicom("DX", pixel_bytes=b"\x00\x08" * (256 * 224))
    server = start_listener(settings, db=db)
    assert server is not None
    try:
        assert _send(settings, [dx, cr, ct, mr, corrupt, flat]) == [0] * 6  # every one recorded
    finally:
        server.shutdown()
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 6
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.stem.split("-")[0] for p in
              (dx, cr, ct, mr, corrupt, flat)}
    processed = run_worker(settings, threading.Event(), db=db, models=models, exit_when_idle=True)
    assert processed == 6
    outcome = {}
    with db.session() as session:
        for instance in session.scalars(select(Instance)):
            job = session.scalars(select(Job).where(Job.instance_pk == instance.id)).one()
            outcome[instance.sop_instance_uid] = (job.state, job.reason or "")
    states = {uid: outcome[uid] for uid in by_uid}
    dx_uid, cr_uid, ct_uid, mr_uid, corrupt_uid, flat_uid = list(by_uid)
    assert states[dx_uid][0] == states[cr_uid][0] == "done"
    assert states[ct_uid][0] == "rejected" and "CT" in states[ct_uid][1]
    assert states[mr_uid][0] == "rejected" and "MR" in states[mr_uid][1]
    assert states[corrupt_uid][0] == "rejected" and "pixel data" in states[corrupt_uid][1]
    assert states[flat_uid][0] == "rejected" and "flat" in states[flat_uid][1]
    with db.session() as session:
        results = {r.instance_pk: r for r in session.scalars(select(AnalysisResult))}
        pk_of = {i.sop_instance_uid: i.id for i in session.scalars(select(Instance))}
    assert len(results) == 6  # one result per instance, rejected ones included
    done = results[pk_of[dx_uid]]
    assert done.is_radiograph and done.fracture_probability is not None and done.detection_call
    assert {m["task"] for m in done.models} >= {"detect", "classify"} and all(len(m["sha256"]) == 64
                                                                              for m in done.models)
    assert done.pixel_spacing_mm == [0.15, 0.15] and done.model_name
    for path in (done.heatmap_path, done.edges_path, done.hybrid_path):
        assert path and Path(path).read_bytes().startswith(b"\x89PNG")
        assert Path(path).parent.name == dx_uid
    rejected = results[pk_of[ct_uid]]
    assert not rejected.is_radiograph and "CT" in rejected.validity_reason


def test_transient_errors_are_retried_then_failed(worker_settings: Settings, db: Database, models,  # type: ignore[no-untyped-def]
                                                  make_dicom) -> None:
    settings = dataclasses.replace(worker_settings, job_max_attempts=2)
    result = ingest(db, settings, make_dicom("DX").read_bytes())
    result.path.unlink()  # the stored file vanished (a storage problem, not the image's fault)
    stop = threading.Event()
    run_worker(settings, stop, db=db, models=models, max_jobs=2, retry_base=0.05, poll_interval=0.05)
    job = _job_for(db, result.instance_pk)
    assert job.state == "failed" and job.attempts == 2 and "FileNotFoundError" in (job.error or "")
    assert _results(db, result.instance_pk) == []


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _open_when_read(fifo: Path, timeout: float) -> int:
    """Open ``fifo`` for writing once a reader has it open (a worker blocked reading it); blocking fd."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading yet
            if time.monotonic() > deadline:
                raise AssertionError("no worker opened the stored file") from None
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return fd


def _worker_process(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FRACTURE_DATA_DIR": str(settings.data_dir), "FRACTURE_DATABASE_URL": settings.database_url,
           "FRACTURE_MODEL_DIR": str(settings.model_dir), "FRACTURE_JOB_LEASE_SECONDS": "2",
           "FRACTURE_LOG_LEVEL": "INFO", "FRACTURE_DICOM_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "work", "--poll-interval", "0.2"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_killed_worker_job_is_completed_once_by_another_and_sigterm_finishes_it(  # type: ignore[no-untyped-def]
        worker_settings: Settings, db: Database, make_dicom, tmp_path: Path) -> None:
    settings = worker_settings
    result = ingest(db, settings, make_dicom("DX").read_bytes())
    content = result.path.read_bytes()
    # The stored file becomes a FIFO: a worker that opens it blocks there, mid-job, until we feed it.
    result.path.unlink()
    os.mkfifo(result.path)
    log_path = tmp_path / "workers.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [_worker_process(settings, log_path) for _ in range(2)]  # two workers share the queue
        _wait_for(lambda: _job_for(db, result.instance_pk).state == "processing", 60, "the first claim")
        owner_pid = int((_job_for(db, result.instance_pk).lease_owner or "::").split(":")[1])
        (first,) = [p for p in procs if p.pid == owner_pid]
        (second,) = [p for p in procs if p.pid != owner_pid]
        first.send_signal(signal.SIGKILL)  # the worker holding the job dies mid-job
        assert first.wait(10) == -signal.SIGKILL
        _wait_for(lambda: _job_for(db, result.instance_pk).attempts == 2, 60, "the lease to expire and a takeover")
        writer = _open_when_read(result.path, 30)  # the second worker is now reading the file, mid-job
        second.send_signal(signal.SIGTERM)  # graceful: the job in hand is finished, then the worker exits
        real = result.path.with_suffix(".real")
        real.write_bytes(content)
        os.replace(real, result.path)  # later readers (study reporting) see the real file
        with os.fdopen(writer, "wb") as fifo:
            fifo.write(content)
        assert second.wait(60) == 0, log_path.read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result.path.exists() and not result.path.is_file():
            result.path.unlink()
            result.path.write_bytes(content)
    job = _job_for(db, result.instance_pk)
    assert job.state == "done" and job.attempts == 2, log_path.read_text()
    assert len(_results(db, result.instance_pk)) == 1
    with db.session() as session:
        claims = session.scalars(select(JobEvent.detail).where(JobEvent.job_pk == job.id,
                                                               JobEvent.state == "processing")).all()
    assert len(claims) == 2 and claims[0] != claims[1]


@pytest.mark.postgres
def test_two_workers_on_postgresql_never_process_the_same_job(postgres_url: str, tmp_path: Path, model_dir: Path,  # type: ignore[no-untyped-def]
                                                              models, make_dicom) -> None:
    upgrade(postgres_url)
    settings = Settings.from_env({}, data_dir=tmp_path / "var", database_url=postgres_url, model_dir=model_dir,
                                 job_lease_seconds=30)
    loader = Database(postgres_url)
    try:
        for _ in range(10):
            ingest(loader, settings, make_dicom("DX", rows=128, cols=128).read_bytes())
    finally:
        loader.dispose()
    counts: dict[str, int] = {}

    def work(name: str) -> None:
        database = Database(postgres_url)
        try:
            counts[name] = run_worker(settings, threading.Event(), db=database, models=models, batch_size=1,
                                      exit_when_idle=True, owner=name)
        finally:
            database.dispose()

    threads = [threading.Thread(target=work, args=(name,)) for name in ("worker-a", "worker-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    check = Database(postgres_url)
    try:
        with check.session() as session:
            assert session.scalar(select(func.count()).select_from(Job).where(Job.state != "done")) == 0
            per_job = session.execute(select(AnalysisResult.job_pk, func.count()).group_by(AnalysisResult.job_pk)).all()
            claims = session.execute(select(JobEvent.job_pk, func.count()).where(JobEvent.state == "processing")
                                     .group_by(JobEvent.job_pk)).all()
    finally:
        check.dispose()
    assert len(per_job) == 10 and all(n == 1 for _, n in per_job)
    assert len(claims) == 10 and all(n == 1 for _, n in claims)
    assert sum(counts.values()) == 10 and all(counts.values()), counts


def test_the_mirror_look_setting_decides_how_the_worker_reads(settings: Settings, db: Database, make_dicom,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    """FRACTURE_MIRROR_LOOK: behind a reader card with ``mirror``, a worker reads each image twice (on) or once
    with the card's one-reading fit (off); the stored probability is what that model set gives the image."""
    from dicom.image import radiograph_from_dataset
    from pipeline.models.bundle import read_card, update_card
    from pipeline.run import load_models, run_fracture_models
    from pipeline.training.toydata import write_untrained_bundles

    root = write_untrained_bundles(tmp_path / "models", reader=True)
    op = read_card(root / "validity").get("operating_point", {})
    update_card(root / "validity", operating_point={**op, "threshold": 0.0})  # every image is analysed
    sha = read_card(root / "detector")["weights"]["sha256"]
    point = {"threshold": 0.5, "indeterminate_band": [0.4, 0.6]}
    update_card(root / "classifier", detection_fusion={
        "detector_sha256": sha, "weights": {"detector_logit": 0.7, "reader_evidence": 0.4}, "bias": -0.2,
        "operating_point": point, "mirror": True,
        "single_reading": {"weights": {"detector_logit": 1.3, "reader_evidence": -0.5}, "bias": 0.3,
                           "operating_point": point}})
    for mirror in (True, False):
        s = dataclasses.replace(settings, model_dir=root, mirror_look=mirror)
        path = make_dicom("DX")  # a new instance each time
        result = ingest(db, s, path.read_bytes())
        assert run_worker(s, threading.Event(), db=db, exit_when_idle=True) == 1
        (row,) = _results(db, result.instance_pk)
        image = radiograph_from_dataset(dcmread(path))
        expected = run_fracture_models(image, load_models(root, mirror=mirror), cams=False).probability
        assert row.fracture_probability == pytest.approx(expected, abs=1e-5)
        other = run_fracture_models(image, load_models(root, mirror=not mirror), cams=False).probability
        assert row.fracture_probability != pytest.approx(other, abs=1e-3)  # the setting made the difference
