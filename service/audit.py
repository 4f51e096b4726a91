"""Append-only audit log of access to patient data and security-relevant actions."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.models import AuditEntry


def audit(session: Session, *, actor_type: str, actor: str, action: str, object_type: str | None = None,
          object_id: str | int | None = None, patient_id: str | None = None, remote_addr: str | None = None,
          outcome: str = "ok", detail: dict[str, Any] | None = None) -> AuditEntry:
    """Add an audit row to ``session`` (committed with the caller's transaction)."""
    entry = AuditEntry(actor_type=actor_type, actor=actor, action=action, object_type=object_type,
                       object_id=None if object_id is None else str(object_id), patient_id=patient_id,
                       remote_addr=remote_addr, outcome=outcome, detail=detail)
    session.add(entry)
    return entry
