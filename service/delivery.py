"""Delivery of generated DICOM objects to PACS nodes: one row per (object, destination), retried until stored.

::

    pending -> sending -> delivered
       ^          |
       +- retrying <-+ (transient failure, attempts left: backoff 5 s * 2^(attempts-1), at most 10 min)
                  |
                  +-> failed (attempts exhausted, or a refusal a retry cannot fix: SOP class refused,
                              presentation context rejected, 0xA9xx / 0xCxxx)

Claiming works like jobs: due rows (``pending``/``retrying`` whose ``next_attempt_at`` has come, or
``sending`` whose lease expired because the sender died) are selected (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL) and each is taken with a conditional UPDATE, so concurrent senders never take the same row
(on SQLite the single writer serialises them). The claimed rows are grouped by destination and sent with
one association per destination (:class:`dicom.sender.StoreSCU`), destinations in parallel so one that is
down (short connect timeout) does not hold up the others. Every result is written conditionally on the
lease, once; a ``delivered`` row is never sent again, across restarts too (the unique constraint on
``(artifact, destination)`` means there is only ever one row to look at). A sender that dies between the
C-STORE and the write leaves a ``sending`` row whose lease expires and is resent: at least once, and the
PACS sees the same SOP Instance UID.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, select, update

from config import Settings
from config.settings import parse_destinations
from dicom.sender import StoreOutcome, StoreSCU
from service.db import Database
from service.models import Artifact, Delivery, utcnow

log = logging.getLogger(__name__)

PENDING, SENDING, RETRYING, DELIVERED, FAILED = "pending", "sending", "retrying", "delivered", "failed"
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 600.0
#: Deliveries claimed per call.
BATCH_SIZE = 200
#: Destinations sent to at the same time (threads, each with its own association).
MAX_PARALLEL_DESTINATIONS = 4


def backoff_seconds(attempts: int) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: 5 s, 10 s, 20 s ... capped at 10 min."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempts - 1))


def lease_seconds(settings: Settings) -> int:
    """How long a claim lasts: long enough for timeouts of a whole batch (connect + DIMSE)."""
    return max(120, settings.job_lease_seconds)


def _due(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        and_(Delivery.state.in_((PENDING, RETRYING)),
             or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now)),
        and_(Delivery.state == SENDING, Delivery.lease_expires_at < now),
    )


@dataclass(frozen=True)
class _Claimed:
    delivery_id: int
    destination: str
    path: Path
    attempts: int


def claim_due(db: Database, settings: Settings, owner: str, limit: int = BATCH_SIZE) -> list[_Claimed]:
    """Take up to ``limit`` due deliveries for ``owner`` (see the module docstring)."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds(settings))
    claimed: list[_Claimed] = []
    with db.session() as session:
        query = select(Delivery.id).where(_due(now)).order_by(Delivery.id).limit(limit)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        ids = list(session.scalars(query))
        for delivery_id in ids:
            taken = session.execute(
                update(Delivery).where(Delivery.id == delivery_id, _due(now))
                .values(state=SENDING, lease_owner=owner, lease_expires_at=expires)
                .execution_options(synchronize_session=False))
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                continue
            row = session.execute(select(Delivery.destination, Delivery.attempts, Artifact.file_path)
                                  .join(Artifact, Artifact.id == Delivery.artifact_pk)
                                  .where(Delivery.id == delivery_id)).one()
            claimed.append(_Claimed(delivery_id, row.destination, Path(row.file_path), row.attempts))
    return claimed


def _send(settings: Settings, destination: str, batch: list[_Claimed]) -> list[tuple[_Claimed, StoreOutcome]]:
    try:
        (node,) = parse_destinations(destination)
    except ValueError as exc:
        return [(c, StoreOutcome(c.path, None, None, f"bad destination {destination!r}: {exc}", permanent=True))
                for c in batch]
    scu = StoreSCU(settings.ae_title, node)
    try:
        outcomes = scu.send([c.path for c in batch])
    except Exception as exc:  # noqa: BLE001 - a bug or odd peer must not lose the batch: retry it
        log.exception("sending to %s failed", destination)
        return [(c, StoreOutcome(c.path, None, None, f"sender error: {exc}")) for c in batch]
    return list(zip(batch, outcomes, strict=True))


def _record(db: Database, settings: Settings, owner: str, claim: _Claimed, outcome: StoreOutcome) -> str:
    now = utcnow()
    attempts = claim.attempts + 1
    values: dict[str, object] = dict(attempts=attempts, last_status=outcome.status, lease_owner=None,
                                     lease_expires_at=None)
    if outcome.stored:
        state = DELIVERED
        values.update(state=state, delivered_at=now, last_error=None, next_attempt_at=None)
    elif outcome.permanent or attempts >= settings.delivery_max_attempts:
        state = FAILED
        values.update(state=state, last_error=outcome.error, next_attempt_at=None)
    else:
        state = RETRYING
        values.update(state=state, last_error=outcome.error,
                      next_attempt_at=now + dt.timedelta(seconds=backoff_seconds(attempts)))
    with db.session() as session:
        result = session.execute(update(Delivery).where(Delivery.id == claim.delivery_id,
                                                        Delivery.state == SENDING, Delivery.lease_owner == owner)
                                 .values(**values).execution_options(synchronize_session=False))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            log.warning("delivery %s: lease lost before the result could be recorded", claim.delivery_id)
            return "lost"
    if state == DELIVERED:
        log.info("delivered %s to %s", claim.path.name, claim.destination)
    else:
        log.warning("delivery %s to %s: %s (%s, attempt %s)", claim.path.name, claim.destination, outcome.error,
                    state, attempts)
    return state


def deliver_due(db: Database, settings: Settings, owner: str) -> int:
    """Send every due delivery; return how many were delivered."""
    claimed = claim_due(db, settings, owner)
    if not claimed:
        return 0
    by_destination: dict[str, list[_Claimed]] = defaultdict(list)
    for claim in claimed:
        by_destination[claim.destination].append(claim)
    delivered = 0
    workers = min(MAX_PARALLEL_DESTINATIONS, len(by_destination))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver") as pool:
        futures = [pool.submit(_send, settings, dest, batch) for dest, batch in by_destination.items()]
        for future in futures:
            for claim, outcome in future.result():
                if _record(db, settings, owner, claim, outcome) == DELIVERED:
                    delivered += 1
    return delivered


def retry(db: Database, *, delivery_id: int | None = None, failed: bool = False) -> int:
    """Make deliveries due again now (an operator's ``deliveries retry``): one by id, or every failed one.

    A delivered row is never resent. Attempts start again from zero, so the backoff and the limit apply anew.
    """
    if (delivery_id is None) == (not failed):
        raise ValueError("give either a delivery id or failed=True")
    condition = Delivery.id == delivery_id if delivery_id is not None else Delivery.state == FAILED
    with db.session() as session:
        result = session.execute(
            update(Delivery).where(condition, Delivery.state.in_((FAILED, RETRYING, PENDING)))
            .values(state=PENDING, attempts=0, next_attempt_at=None, lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False))
        return int(result.rowcount)  # type: ignore[attr-defined]
