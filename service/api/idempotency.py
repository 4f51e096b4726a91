"""``Idempotency-Key``: a retried request gets the first one's response instead of doing the work again.

A key is scoped to the API key that sent it (``owner`` = the key's prefix). The request is summarised by a
hash of what it means (method, path, form fields, and each file's field name, filename, content type and
SHA-256), not of its raw bytes, so a client library that picks a new multipart boundary on retry still
matches. The same key with the same request replays the stored status and body; with a different request it
is 409. A key whose first request is still running is 409 too (retry later), unless that claim is older than
:data:`STALE_SECONDS` (its process died). A request that fails with an error does not keep its key, so the
client may retry it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from flask import Request
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from service.db import Database
from service.errors import Conflict, ServiceError
from service.models import IdempotencyKey, utcnow

MAX_KEY_LENGTH = 128
IN_PROGRESS = 0
#: A claim older than this whose request never finished belonged to a process that died.
STALE_SECONDS = 600


@dataclass(frozen=True)
class Stored:
    status_code: int
    body: dict[str, Any]


def request_hash(request: Request, files: list[tuple[str, str | None, str | None, str]]) -> str:
    """A SHA-256 over the request's meaning; ``files`` are (field, filename, content type, sha256)."""
    summary = {
        "method": request.method,
        "path": request.path,
        "form": sorted((k, v) for k, values in request.form.lists() for v in values),
        "files": sorted([list(map(str, f)) for f in files]),
    }
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def _age_seconds(created_at: dt.datetime) -> float:
    if created_at.tzinfo is None:  # SQLite hands back naive UTC
        created_at = created_at.replace(tzinfo=dt.UTC)
    return (utcnow() - created_at).total_seconds()


def validate_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ServiceError(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters",
                           code="invalid_idempotency_key")
    return key


def begin(db: Database, owner: str, key: str, digest: str) -> Stored | None:
    """Claim ``key`` for this request (None: go ahead), or return the stored response to replay."""
    try:
        with db.session() as session:
            session.add(IdempotencyKey(owner=owner, key=key, request_hash=digest, status_code=IN_PROGRESS,
                                       response={}))
        return None
    except IntegrityError:
        pass
    with db.session() as session:
        row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                          IdempotencyKey.key == key))
        if row is None:  # the first request failed and released the key between our two statements
            raise Conflict("this Idempotency-Key was just released; retry the request",
                           code="idempotency_key_in_use")
        if row.request_hash != digest:
            raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_key_reused")
        if row.status_code == IN_PROGRESS and _age_seconds(row.created_at) > STALE_SECONDS:
            # Its first request died without finishing or releasing it (a crashed process): take it over.
            row.created_at = utcnow()
            return None
        if row.status_code == IN_PROGRESS:
            raise Conflict("a request with this Idempotency-Key is still being processed; retry later",
                           code="idempotency_key_in_use")
        return Stored(row.status_code, dict(row.response))


def finish(db: Database, owner: str, key: str, status_code: int, body: dict[str, Any]) -> None:
    with db.session() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key)
                        .values(status_code=status_code, response=body))


def release(db: Database, owner: str, key: str) -> None:
    with db.session() as session:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key,
                                                     IdempotencyKey.status_code == IN_PROGRESS))
