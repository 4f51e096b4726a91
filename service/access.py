"""Who may see which study: the one set of authorisation rules shared by the REST API and the portal.

- An **admin** sees every study.
- A **clinician** sees the studies they uploaded (``Study.uploaded_by_id``) and those whose Referring
  Physician's Name (0008,0090) equals their ``User.referring_physician_name`` (DICOM PN ``Family^Given``,
  compared case-insensitively, trailing empty components and surrounding spaces ignored).
- A **service** account (an integrator's key) sees the studies it submitted.

A study a user may not see does not exist for them: :func:`get_study_for` raises
:class:`~service.errors.NotFound` (404, never 403) so study ids cannot be probed.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Select, false, func, or_, select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.models import Study, User


def normalise_person_name(name: str | None) -> str:
    """A DICOM PN value as compared: spaces around it and trailing empty components (``^``) dropped, upper
    case. :func:`_visibility_clause` does exactly this in SQL, so list and detail views agree."""
    if not name:
        return ""
    return name.strip().rstrip("^").upper()


def _visibility_clause(user: User) -> ColumnElement[bool] | None:
    if user.is_admin:
        return None
    clauses = [Study.uploaded_by_id == user.id]
    if user.role == "clinician":
        name = normalise_person_name(user.referring_physician_name)
        if name:
            column = func.upper(func.rtrim(func.trim(Study.referring_physician_name), "^"))
            clauses.append(column == name)
    return or_(*clauses)


def visible_studies(session: Session, user: User) -> Select[Study]:
    """A ``SELECT`` of the studies ``user`` may see (add filters, order and limits to it)."""
    del session  # the rules need no lookup today; kept in the signature for rules that will
    query = select(Study)
    if not user.is_active:
        return query.where(false())
    clause = _visibility_clause(user)
    return query if clause is None else query.where(clause)


def can_see_study(session: Session, user: User, study: Study) -> bool:
    """Whether ``user`` may see ``study`` (the same rules as :func:`visible_studies`)."""
    del session
    if not user.is_active:
        return False
    if user.is_admin:
        return True
    if study.uploaded_by_id is not None and study.uploaded_by_id == user.id:
        return True
    if user.role == "clinician":
        mine = normalise_person_name(user.referring_physician_name)
        return bool(mine) and normalise_person_name(study.referring_physician_name) == mine
    return False


def get_study_for(session: Session, user: User, study_id: int) -> Study:
    """The study with primary key ``study_id`` if ``user`` may see it; else :class:`NotFound` (404)."""
    study = session.get(Study, study_id) if isinstance(study_id, int) and 0 < study_id < 2**63 else None
    if study is None or not can_see_study(session, user, study):
        raise NotFound(f"study {study_id} not found")
    return study
