"""The job state machine, stored in the database, and how workers claim jobs.

::

    received -> queued -> processing -> done | rejected | failed
                  ^           |
                  +-----------+  (transient error with attempts left: back to queued with a backoff;
                                  lease expired: claimed again by another worker)

``rejected`` is for inputs validation refused (wrong modality, not a radiograph, unreadable pixel data),
with the reason; ``failed`` is for transient errors that outlived ``max_attempts``, with the error text.
Every transition adds a timestamped :class:`~service.models.JobEvent`. Delivery of outputs is tracked
separately (``deliveries``).

Claiming is one statement, ``UPDATE jobs SET state='processing', lease... WHERE id IN (SELECT ... LIMIT n
FOR UPDATE SKIP LOCKED) RETURNING ...``: on PostgreSQL concurrent workers skip each other's rows; on
SQLite ``FOR UPDATE`` is not rendered and the UPDATE holds the database's single write lock, so claims
are serialised (the single-writer fallback). A claim is identified by ``(lease_owner, attempts)``: every
later write by the worker (renew, complete, retry, release) is conditional on both, so a worker whose
lease expired and whose job was taken over cannot write a second result.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from service.db import Database
from service.models import Job, JobEvent, utcnow

log = logging.getLogger(__name__)

RECEIVED, QUEUED, PROCESSING = "received", "queued", "processing"
DONE, REJECTED, FAILED = "done", "rejected", "failed"
TERMINAL = frozenset({DONE, REJECTED, FAILED})
STATES = (RECEIVED, QUEUED, PROCESSING, DONE, REJECTED, FAILED)
#: Allowed transitions (operators may send a terminal job back to the queue: ``jobs retry``).
TRANSITIONS: dict[str, frozenset[str]] = {
    RECEIVED: frozenset({QUEUED}),
    QUEUED: frozenset({PROCESSING}),
    PROCESSING: frozenset({DONE, REJECTED, FAILED, QUEUED, PROCESSING}),
    DONE: frozenset({QUEUED}),
    REJECTED: frozenset({QUEUED}),
    FAILED: frozenset({QUEUED}),
}


class JobError(Exception):
    """An operator asked for something the state machine does not allow."""


@dataclass(frozen=True)
class Claim:
    """A job a worker holds: ``(owner, attempt)`` is the lease token."""

    job_id: int
    instance_pk: int
    attempt: int
    max_attempts: int
    owner: str


def _event(session: Session, job_id: int, state: str, detail: str | None = None,
           at: dt.datetime | None = None) -> None:
    session.add(JobEvent(job_pk=job_id, state=state, detail=detail, at=at or utcnow()))


def create_job(session: Session, instance_pk: int, *, max_attempts: int, detail: str | None = None) -> Job:
    """A new job for a stored instance: ``received`` then ``queued``, in the caller's transaction."""
    now = utcnow()
    job = Job(instance_pk=instance_pk, state=QUEUED, max_attempts=max_attempts, created_at=now, updated_at=now)
    session.add(job)
    session.flush()
    _event(session, job.id, RECEIVED, detail, now)
    _event(session, job.id, QUEUED, None, now)
    return job


def _lease_token(claim: Claim) -> ColumnElement[bool]:
    return and_(Job.id == claim.job_id, Job.lease_owner == claim.owner, Job.attempts == claim.attempt,
                Job.state == PROCESSING)


def fail_abandoned(db: Database) -> int:
    """Fail jobs whose lease expired on their last attempt (their worker died every time)."""
    now = utcnow()
    abandoned = and_(Job.state == PROCESSING, Job.lease_expires_at < now, Job.attempts >= Job.max_attempts)
    with db.session() as session:
        if session.scalar(select(Job.id).where(abandoned).limit(1)) is None:
            return 0  # the common case, without taking SQLite's write lock
        rows = session.execute(
            update(Job)
            .where(abandoned)
            .values(state=FAILED, lease_owner=None, lease_expires_at=None, finished_at=now, updated_at=now,
                    error=func.coalesce(Job.error, "") + "worker lost (lease expired) on the last attempt")
            .returning(Job.id)
        ).scalars().all()
        for job_id in rows:
            _event(session, job_id, FAILED, "worker lost (lease expired) on the last attempt", now)
    for job_id in rows:
        log.error("job %s failed: its worker was lost on the last attempt", job_id)
    return len(rows)


def claim_jobs(db: Database, owner: str, *, limit: int, lease_seconds: float) -> list[Claim]:
    """Claim up to ``limit`` runnable jobs (queued and due, or processing with an expired lease)."""
    fail_abandoned(db)
    now = utcnow()
    runnable = or_(
        and_(Job.state == QUEUED, or_(Job.not_before.is_(None), Job.not_before <= now)),
        and_(Job.state == PROCESSING, Job.lease_expires_at < now, Job.attempts < Job.max_attempts),
    )
    candidates = (select(Job.id).where(runnable).order_by(Job.id).limit(limit)
                  .with_for_update(skip_locked=True))
    with db.session() as session:
        if session.scalar(select(Job.id).where(runnable).limit(1)) is None:
            return []  # idle: no write (and no SQLite write lock) at all
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(candidates))
            .values(state=PROCESSING, lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1, started_at=now, updated_at=now, not_before=None)
            .returning(Job.id, Job.instance_pk, Job.attempts, Job.max_attempts)
            .execution_options(synchronize_session=False)
        ).all()
        claims = sorted((Claim(r.id, r.instance_pk, r.attempts, r.max_attempts, owner) for r in rows),
                        key=lambda c: c.job_id)
        if claims:
            session.execute(insert(JobEvent), [
                {"job_pk": c.job_id, "state": PROCESSING, "at": now,
                 "detail": f"claimed by {owner} (attempt {c.attempt}/{c.max_attempts})"} for c in claims])
    return claims


def renew_leases(db: Database, claims: Sequence[Claim], lease_seconds: float) -> int:
    """Extend the leases still held; returns how many were (a lost one is not extended)."""
    if not claims:
        return 0
    now = utcnow()
    renewed = 0
    with db.session() as session:
        for claim in claims:
            result = session.execute(update(Job).where(_lease_token(claim))
                                     .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))
            renewed += result.rowcount  # type: ignore[attr-defined]
    return renewed


def finish(session: Session, claim: Claim, state: str, *, reason: str | None = None,
           error: str | None = None) -> bool:
    """Move a claimed job to ``done``/``rejected``/``failed`` in the caller's transaction.

    Returns False when the lease was lost (another worker took the job): the caller must roll back.
    """
    if state not in TERMINAL:
        raise JobError(f"{state!r} is not a terminal state")
    now = utcnow()
    result = session.execute(update(Job).where(_lease_token(claim)).values(
        state=state, reason=reason, error=error, lease_owner=None, lease_expires_at=None, finished_at=now,
        updated_at=now))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, claim.job_id, state, reason or error, now)
    return True


def retry_later(db: Database, claim: Claim, error: str, *, base_delay: float) -> str:
    """A transient error: back to ``queued`` after ``base_delay * 2**(attempt-1)`` s, or ``failed``."""
    now = utcnow()
    with db.session() as session:
        if claim.attempt >= claim.max_attempts:
            ok = finish(session, claim, FAILED, error=error)
            return FAILED if ok else "lost"
        delay = base_delay * 2 ** (claim.attempt - 1)
        result = session.execute(update(Job).where(_lease_token(claim)).values(
            state=QUEUED, error=error, lease_owner=None, lease_expires_at=None, updated_at=now,
            not_before=now + dt.timedelta(seconds=delay)))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return "lost"
        _event(session, claim.job_id, QUEUED, f"retry in {delay:.1f} s after: {error}", now)
    return QUEUED


def release(db: Database, claims: Sequence[Claim], detail: str = "released by a stopping worker") -> int:
    """Give claimed jobs back to the queue unprocessed (the attempt does not count)."""
    now = utcnow()
    released = 0
    with db.session() as session:
        for claim in claims:
            result = session.execute(update(Job).where(_lease_token(claim)).values(
                state=QUEUED, lease_owner=None, lease_expires_at=None, attempts=Job.attempts - 1, updated_at=now))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                _event(session, claim.job_id, QUEUED, detail, now)
                released += 1
    return released


# ---------------------------------------------------------------------------------------- operators


def list_jobs(db: Database, *, state: str | None = None, limit: int = 50) -> list[Job]:
    with db.session() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        return list(session.scalars(query))


def retry_job(db: Database, job_id: int, *, actor: str = "operator") -> Job:
    """Send a terminal job (failed, rejected or done) back to the queue with fresh attempts."""
    now = utcnow()
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobError(f"no job {job_id}")
        if QUEUED not in TRANSITIONS[job.state] or job.state == PROCESSING:
            raise JobError(f"job {job_id} is {job.state}; only done, rejected or failed jobs can be retried")
        job.state, job.attempts, job.not_before, job.updated_at = QUEUED, 0, None, now
        job.error = job.reason = None
        job.finished_at = None
        _event(session, job.id, QUEUED, f"retry requested by {actor}", now)
    return job


def requeue_failed(db: Database, *, actor: str = "operator") -> int:
    """Send every ``failed`` job back to the queue; returns how many."""
    now = utcnow()
    with db.session() as session:
        ids = session.execute(
            update(Job).where(Job.state == FAILED)
            .values(state=QUEUED, attempts=0, not_before=None, error=None, finished_at=None, updated_at=now)
            .returning(Job.id)
        ).scalars().all()
        for job_id in ids:
            _event(session, job_id, QUEUED, f"requeued by {actor}", now)
    return len(ids)


def counts(db: Database) -> dict[str, int]:
    with db.session() as session:
        return {state: n for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
