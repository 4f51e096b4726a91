"""service.jobs: the state machine, leases, retries and the operators' commands, on real databases."""

from __future__ import annotations

import datetime as dt

from click.testing import CliRunner
from sqlalchemy import select, update

from config import Settings
from service import jobs
from service.db import Database
from service.ingest import ingest
from service.models import Job, JobEvent, utcnow


def _queue(db: Database, settings: Settings, make_dicom, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [ingest(db, settings, make_dicom("DX", rows=64, cols=64).read_bytes()).job_pk for _ in range(n)]  # type: ignore[misc]


def _job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _events(db: Database, job_id: int) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(JobEvent.state).where(JobEvent.job_pk == job_id).order_by(JobEvent.id)))


def test_claim_lease_expiry_and_exactly_one_completion(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    ids = _queue(db, settings, make_dicom, 3)
    first = jobs.claim_jobs(db, "worker-a", limit=2, lease_seconds=30)
    assert [c.job_id for c in first] == ids[:2] and all(c.attempt == 1 for c in first)
    second = jobs.claim_jobs(db, "worker-b", limit=5, lease_seconds=30)
    assert [c.job_id for c in second] == ids[2:]
    assert jobs.claim_jobs(db, "worker-c", limit=5, lease_seconds=30) == []
    assert jobs.renew_leases(db, first, 30) == 2
    # worker-a dies: its lease on the first job expires and worker-c takes it over
    with db.session() as session:
        session.execute(update(Job).where(Job.id == ids[0]).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    (taken,) = jobs.claim_jobs(db, "worker-c", limit=5, lease_seconds=30)
    assert taken.job_id == ids[0] and taken.attempt == 2
    assert jobs.renew_leases(db, first, 30) == 1  # the lost lease is not renewed
    with db.session() as session:
        assert not jobs.finish(session, first[0], jobs.DONE, reason="late")  # lease lost: no completion
    with db.session() as session:
        assert jobs.finish(session, taken, jobs.DONE, reason="ok")
    job = _job(db, ids[0])
    assert job.state == "done" and job.lease_owner is None and job.finished_at is not None
    assert _events(db, ids[0]) == ["received", "queued", "processing", "processing", "done"]
    assert jobs.release(db, second) == 1
    assert _job(db, ids[2]).state == "queued" and _job(db, ids[2]).attempts == 0


def test_transient_errors_back_off_then_fail(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(db, settings, make_dicom, 1)
    for attempt in range(1, settings.job_max_attempts + 1):
        (claim,) = jobs.claim_jobs(db, "w", limit=1, lease_seconds=30)
        assert claim.attempt == attempt
        outcome = jobs.retry_later(db, claim, f"OSError: boom {attempt}", base_delay=10)
        job = _job(db, job_id)
        if attempt < settings.job_max_attempts:
            assert outcome == "queued" and job.state == "queued"
            delay = (job.not_before.replace(tzinfo=dt.UTC) if job.not_before.tzinfo is None  # type: ignore[union-attr]
                     else job.not_before) - utcnow()
            assert 10 * 2 ** (attempt - 1) - 2 < delay.total_seconds() <= 10 * 2 ** (attempt - 1)
            assert jobs.claim_jobs(db, "w", limit=1, lease_seconds=30) == []  # not due yet
            with db.session() as session:
                session.execute(update(Job).values(not_before=utcnow() - dt.timedelta(seconds=1)))
        else:
            assert outcome == "failed" and job.state == "failed" and job.error == "OSError: boom 3"
    assert _events(db, job_id)[-1] == "failed"


def test_lease_lost_on_the_last_attempt_fails_the_job(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(db, settings, make_dicom, 1)
    with db.session() as session:
        session.execute(update(Job).values(attempts=settings.job_max_attempts - 1))
    jobs.claim_jobs(db, "doomed", limit=1, lease_seconds=30)
    with db.session() as session:
        session.execute(update(Job).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert jobs.claim_jobs(db, "other", limit=1, lease_seconds=30) == []
    job = _job(db, job_id)
    assert job.state == "failed" and "lease expired" in (job.error or "")


def test_operator_commands(settings: Settings, db: Database, make_dicom) -> None:  # type: ignore[no-untyped-def]
    from service.cli import cli

    ids = _queue(db, settings, make_dicom, 3)
    claims = jobs.claim_jobs(db, "w", limit=3, lease_seconds=30)
    with db.session() as session:
        jobs.finish(session, claims[0], jobs.FAILED, error="RuntimeError: disk on fire")
        jobs.finish(session, claims[1], jobs.REJECTED, reason="CT object is not a plain radiograph")
    env = {"FRACTURE_DATA_DIR": str(settings.data_dir), "FRACTURE_DATABASE_URL": settings.database_url}
    runner = CliRunner()
    listing = runner.invoke(cli, ["jobs", "list"], env=env)
    assert listing.exit_code == 0, listing.output
    assert "disk on fire" in listing.output and "not a plain radiograph" in listing.output
    assert "1 failed" in listing.output and "1 processing" in listing.output
    assert "rejected" in runner.invoke(cli, ["jobs", "list", "--state", "rejected"], env=env).output
    busy = runner.invoke(cli, ["jobs", "retry", str(ids[2])], env=env)
    assert busy.exit_code == 1 and "processing" in busy.output
    assert runner.invoke(cli, ["jobs", "retry", "999999"], env=env).exit_code == 1
    retried = runner.invoke(cli, ["jobs", "retry", str(ids[1])], env=env)
    assert retried.exit_code == 0 and _job(db, ids[1]).state == "queued"
    requeued = runner.invoke(cli, ["jobs", "requeue-failed"], env=env)
    assert requeued.exit_code == 0 and "1 failed job(s) queued" in requeued.output
    job = _job(db, ids[0])
    assert job.state == "queued" and job.attempts == 0 and job.error is None
    assert _events(db, ids[0])[-2:] == ["failed", "queued"]
