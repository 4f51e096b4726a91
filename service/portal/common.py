"""What every portal view shares: the logged-in user, a database session, audit rows, masking."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from flask import abort, request
from flask_login import UserMixin, current_user, login_required
from sqlalchemy.orm import Session

from service.audit import audit
from service.extensions import current_db
from service.models import User

F = TypeVar("F", bound=Callable[..., Any])


class PortalUser(UserMixin):
    """The signed-in user as Flask-Login sees it: a detached :class:`User` row.

    The session id includes a fragment of the password hash, so resetting a password ends every session
    that was opened with the old one."""

    def __init__(self, user: User) -> None:
        self.user = user

    def get_id(self) -> str:
        return f"{self.user.id}:{(self.user.password_hash or '')[-16:]}"

    @property
    def is_active(self) -> bool:  # type: ignore[override]
        return bool(self.user.is_active)

    @property
    def id(self) -> int:
        return self.user.id

    @property
    def username(self) -> str:
        return self.user.username

    @property
    def display_name(self) -> str:
        return self.user.display_name or self.user.username

    @property
    def is_admin(self) -> bool:
        return self.user.is_admin


def me() -> User:
    """The signed-in user's row (detached)."""
    return current_user.user  # type: ignore[no-any-return]


@contextmanager
def db_session() -> Iterator[Session]:
    with current_db().session() as session:
        yield session


def remote_addr() -> str | None:
    return request.remote_addr


def audit_user(session: Session, action: str, *, object_type: str | None = None, object_id: Any = None,
               patient_id: str | None = None, outcome: str = "ok", detail: dict[str, Any] | None = None,
               actor: str | None = None) -> None:
    """An audit row for the signed-in user (or ``actor``), from this request's address."""
    audit(session, actor_type="user", actor=actor or current_user.username, action=action,
          object_type=object_type, object_id=object_id, patient_id=patient_id, remote_addr=remote_addr(),
          outcome=outcome, detail=detail)


def admin_required(view: F) -> F:
    """Only admins; anyone else gets a 404 (the admin pages do not exist for them)."""

    @functools.wraps(view)
    @login_required
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_admin:
            abort(404)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def mask_name(name: str | None) -> str:
    """``DOE^JANE`` -> ``D*** J***``: the initial of each name component, the rest hidden."""
    if not name:
        return "—"
    parts = [p for p in name.replace("^", " ").split() if p]
    return " ".join(f"{p[0]}***" for p in parts) or "—"


def mask_id(patient_id: str | None) -> str:
    """``PID-123456`` -> ``••••56``: only the last two characters, so a list can still be scanned."""
    if not patient_id:
        return "—"
    return "••••" + patient_id[-2:] if len(patient_id) > 2 else "••••"


def display_name(name: str | None) -> str:
    """A DICOM PN (``Family^Given^Middle``) for people: ``Family, Given Middle``."""
    if not name:
        return ""
    parts = name.split("^")
    family, rest = parts[0].strip(), " ".join(p.strip() for p in parts[1:3] if p.strip())
    return f"{family}, {rest}" if family and rest else family or rest


def parse_iso(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def fmt_time(value: str | dt.datetime | None, with_seconds: bool = False) -> str:
    """An ISO timestamp (or datetime) as ``2026-11-23 22:10 UTC``."""
    if value is None or value == "":
        return ""
    when = parse_iso(value) if isinstance(value, str) else value
    if when is None:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC" if with_seconds else "%Y-%m-%d %H:%M UTC")


def fmt_da(value: str | None) -> str:
    """A DICOM DA (``YYYYMMDD``) as ``YYYY-MM-DD``."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def pct(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


TYPE_LABELS = {"fracture_dislocation": "Fracture-dislocation"}


def type_label(name: str | None) -> str:
    if not name:
        return "—"
    return TYPE_LABELS.get(name, name.replace("_", " ").capitalize())


CALL_LABELS = {"fracture": "Fracture suspected", "no_fracture": "No fracture detected",
               "indeterminate": "Indeterminate"}


def call_label(call: str | None) -> str:
    return CALL_LABELS.get(call or "", "—")
