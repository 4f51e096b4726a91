"""Sign in and sign out. Passwords are Argon2id hashes (:mod:`service.auth`); after
:data:`MAX_FAILED_LOGINS` failures in a row an account is locked for :data:`LOCKOUT` (audited)."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit

from flask import flash, jsonify, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from sqlalchemy import select

from service.audit import audit
from service.auth import hash_password, password_needs_rehash, verify_password
from service.extensions import current_db
from service.models import User, utcnow
from service.portal import bp
from service.portal.common import PortalUser, db_session, remote_addr
from service.portal.forms import EmptyForm, LoginForm

MAX_FAILED_LOGINS = 5
LOCKOUT = dt.timedelta(minutes=15)
#: Verified against when the username is unknown, so both cases take the same time.
_DUMMY_HASH = hash_password("not a real password, only for timing")


def load_user(user_id: str) -> PortalUser | None:
    """Flask-Login's loader: ``"<id>:<hash fragment>"`` -> the active user whose hash still matches."""
    pk, _, fragment = user_id.partition(":")
    if not pk.isdigit():
        return None
    with current_db().session() as s:
        user = s.get(User, int(pk))
        if user is None or not user.is_active or user.role not in ("clinician", "admin"):
            return None
        if (user.password_hash or "")[-16:] != fragment:
            return None
        return PortalUser(user)


def unauthorized() -> Any:
    """Not signed in: a page redirects to the sign-in form; a fetch (``Accept: application/json``) gets 401."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify({"ok": False, "error": "not signed in (the session expired?): reload the page"}), 401
    return redirect(url_for("portal.login", next=request.full_path.rstrip("?") if request.method == "GET" else None))


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no ``//``) may be the redirect after sign-in."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//"):
            return target
    return url_for("portal.history")


@bp.get("/")
def index() -> Any:
    return redirect(url_for("portal.history" if current_user.is_authenticated else "portal.login"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if current_user.is_authenticated:
        return redirect(url_for("portal.history"))
    form = LoginForm()
    error = None
    status = 200
    if form.validate_on_submit():
        username = form.username.data.strip()
        password = form.password.data
        now = utcnow()
        with db_session() as s:
            user = s.scalar(select(User).where(User.username == username))
            locked_until = _aware(user.locked_until) if user else None
            if user is None or user.role not in ("clinician", "admin"):
                verify_password(_DUMMY_HASH, password)
                audit(s, actor_type="user", actor=username[:128], action="user.login", remote_addr=remote_addr(),
                      outcome="denied", detail={"reason": "unknown user"})
                error = "Invalid username or password."
            elif locked_until is not None and locked_until > now:
                minutes = max(1, int((locked_until - now).total_seconds() // 60) + 1)
                audit(s, actor_type="user", actor=username, action="user.login", remote_addr=remote_addr(),
                      outcome="denied", detail={"reason": "locked"})
                error = (f"This account is locked after {MAX_FAILED_LOGINS} failed sign-ins. Try again in "
                         f"{minutes} minute{'s' if minutes != 1 else ''} or ask an administrator.")
            elif not user.is_active or not verify_password(user.password_hash, password):
                reason = "disabled" if not user.is_active else "bad password"
                user.failed_logins = (user.failed_logins or 0) + 1
                if user.failed_logins >= MAX_FAILED_LOGINS:
                    user.locked_until = now + LOCKOUT
                    user.failed_logins = 0
                    audit(s, actor_type="user", actor=username, action="user.locked", object_type="user",
                          object_id=user.id, remote_addr=remote_addr(), outcome="denied",
                          detail={"minutes": int(LOCKOUT.total_seconds() // 60)})
                audit(s, actor_type="user", actor=username, action="user.login", remote_addr=remote_addr(),
                      outcome="denied", detail={"reason": reason})
                error = "Invalid username or password."
            else:
                if password_needs_rehash(user.password_hash or ""):
                    user.password_hash = hash_password(password)
                user.failed_logins = 0
                user.locked_until = None
                user.last_login_at = now
                audit(s, actor_type="user", actor=username, action="user.login", object_type="user",
                      object_id=user.id, remote_addr=remote_addr())
                s.flush()
                portal_user = PortalUser(user)
        if error is None:
            session.clear()  # no session fixation: a fresh session for the signed-in user
            login_user(portal_user)
            return redirect(_safe_next(request.args.get("next")))
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("portal/login.html", form=form, error=error), status


@bp.post("/logout")
@login_required
def logout() -> Any:
    form = EmptyForm()
    if form.validate_on_submit():
        with db_session() as s:
            audit(s, actor_type="user", actor=current_user.username, action="user.logout", object_type="user",
                  object_id=current_user.id, remote_addr=remote_addr())
    logout_user()
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("portal.login"))
