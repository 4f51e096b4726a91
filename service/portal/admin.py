"""Administration: users, API keys, PACS destinations and their delivery health, the audit log, the job
queue. Admins only; for anyone else these pages do not exist (404). Every change is audited.

A generated password or a new API key is shown once in the response that created it, never put in the
(client-side) session or a URL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import func, or_, select

from service import jobs as jobq
from service.auth import AuthError, create_api_key, create_user, generate_password, hash_password
from service.extensions import current_db, current_settings
from service.models import ApiKey, AuditEntry, Delivery, Job, User
from service.portal import bp
from service.portal.common import admin_required, audit_user, db_session
from service.portal.forms import ApiKeyForm, EmptyForm, UserEditForm, UserForm, choices

AUDIT_PAGE = 50


@bp.get("/admin")
@admin_required
def admin_home() -> Any:
    return redirect(url_for("portal.admin_jobs"))


# ----------------------------------------------------------------------------------------------- users


def _users() -> list[User]:
    with db_session() as s:
        return list(s.scalars(select(User).order_by(User.username)))


@bp.route("/admin/users", methods=["GET", "POST"])
@admin_required
def admin_users() -> Any:
    form = UserForm()
    created: dict[str, str] | None = None
    if request.method == "POST":
        if form.validate_on_submit():
            password = form.password.data or generate_password()
            try:
                with db_session() as s:
                    user = create_user(s, form.username.data.strip(), password, role=form.role.data,
                                       display_name=(form.display_name.data or "").strip(),
                                       referring_physician_name=(form.referring_physician_name.data or "").strip()
                                       or None)
                    audit_user(s, "admin.user.create", object_type="user", object_id=user.id,
                               detail={"username": user.username, "role": user.role})
                created = {"username": form.username.data.strip(),
                           "password": "" if form.password.data else password}
                form = UserForm(formdata=None)
            except AuthError as exc:
                form.username.errors = [*form.username.errors, str(exc)]
        status = 200 if created else 400
    else:
        status = 200
    return render_template("portal/admin/users.html", users=_users(), form=form, created=created,
                           now=dt.datetime.now(dt.UTC), empty=EmptyForm()), status


def _user_or_404(s: Any, user_id: int) -> User:
    user = s.get(User, user_id)
    if user is None:
        abort(404)
    return user


@bp.route("/admin/users/<int:user_id>", methods=["GET", "POST"])
@admin_required
def admin_user(user_id: int) -> Any:
    with db_session() as s:
        user = _user_or_404(s, user_id)
        form = UserEditForm(obj=user)
        if request.method == "POST" and form.validate_on_submit():
            if user.id == current_user.id and (not form.is_active.data or form.role.data != "admin"):
                flash("You cannot disable or demote your own account.", "error")
                return redirect(url_for("portal.admin_user", user_id=user_id))
            before = {"role": user.role, "active": user.is_active, "rpn": user.referring_physician_name}
            if user.role != "service":
                user.role = form.role.data
            user.display_name = (form.display_name.data or "").strip() or user.username
            user.referring_physician_name = (form.referring_physician_name.data or "").strip() or None
            user.is_active = bool(form.is_active.data)
            audit_user(s, "admin.user.update", object_type="user", object_id=user.id,
                       detail={"before": before, "after": {"role": user.role, "active": user.is_active,
                                                           "rpn": user.referring_physician_name}})
            flash(f"Saved {user.username}.", "info")
            return redirect(url_for("portal.admin_users"))
        return render_template("portal/admin/user.html", user=user, form=form, empty=EmptyForm(), new_password=None)


@bp.post("/admin/users/<int:user_id>/reset-password")
@admin_required
def admin_reset_password(user_id: int) -> Any:
    EmptyForm().validate_on_submit()
    password = generate_password()
    with db_session() as s:
        user = _user_or_404(s, user_id)
        user.password_hash = hash_password(password)
        user.failed_logins = 0
        user.locked_until = None
        audit_user(s, "admin.user.reset_password", object_type="user", object_id=user.id)
        form = UserEditForm(obj=user, formdata=None)
        return render_template("portal/admin/user.html", user=user, form=form, empty=EmptyForm(),
                               new_password=password)


@bp.post("/admin/users/<int:user_id>/unlock")
@admin_required
def admin_unlock(user_id: int) -> Any:
    with db_session() as s:
        user = _user_or_404(s, user_id)
        user.failed_logins = 0
        user.locked_until = None
        audit_user(s, "admin.user.unlock", object_type="user", object_id=user.id)
        flash(f"Unlocked {user.username}.", "info")
    return redirect(url_for("portal.admin_users"))


# -------------------------------------------------------------------------------------------- API keys


@bp.route("/admin/apikeys", methods=["GET", "POST"])
@admin_required
def admin_apikeys() -> Any:
    form = ApiKeyForm()
    users = _users()
    form.username.choices = choices(*[(u.username, f"{u.username} ({u.role})") for u in users if u.is_active])
    new_key = None
    status = 200
    if request.method == "POST":
        if form.validate_on_submit():
            with db_session() as s:
                owner = s.scalar(select(User).where(User.username == form.username.data))
                if owner is None:
                    abort(400)
                key, plaintext = create_api_key(s, owner, form.name.data.strip())
                audit_user(s, "admin.apikey.create", object_type="api_key", object_id=key.prefix,
                           detail={"owner": owner.username, "name": key.name})
            new_key = plaintext
        else:
            status = 400
    with db_session() as s:
        keys = s.execute(select(ApiKey, User.username).join(User, User.id == ApiKey.user_id)
                         .order_by(ApiKey.id.desc())).all()
    return render_template("portal/admin/apikeys.html", keys=keys, form=form, new_key=new_key,
                           empty=EmptyForm()), status


@bp.post("/admin/apikeys/<int:key_id>/revoke")
@admin_required
def admin_revoke_key(key_id: int) -> Any:
    with db_session() as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            abort(404)
        if key.revoked_at is None:
            key.revoked_at = dt.datetime.now(dt.UTC)
            audit_user(s, "admin.apikey.revoke", object_type="api_key", object_id=key.prefix)
        flash(f"Revoked key {key.prefix}.", "info")
    return redirect(url_for("portal.admin_apikeys"))


# -------------------------------------------------------------------------------------- destinations


@bp.get("/admin/destinations")
@admin_required
def admin_destinations() -> Any:
    """The configured PACS destinations and the health of deliveries to each (also ones no longer set)."""
    configured = [str(d) for d in current_settings().destinations]
    stats: dict[str, dict[str, Any]] = {name: {"counts": {}, "last_delivered": None, "last_error": None,
                                               "configured": True} for name in configured}
    with db_session() as s:
        for dest, state, n in s.execute(select(Delivery.destination, Delivery.state, func.count())
                                        .group_by(Delivery.destination, Delivery.state)):
            entry = stats.setdefault(dest, {"counts": {}, "last_delivered": None, "last_error": None,
                                            "configured": False})
            entry["counts"][state] = n
        for dest, last in s.execute(select(Delivery.destination, func.max(Delivery.delivered_at))
                                    .group_by(Delivery.destination)):
            stats[dest]["last_delivered"] = last
        for dest in stats:
            failed = s.scalar(select(Delivery).where(Delivery.destination == dest, Delivery.last_error.is_not(None),
                                                     Delivery.state != "delivered")
                              .order_by(Delivery.id.desc()).limit(1))
            if failed is not None:
                stats[dest]["last_error"] = (failed.last_error or "")[:300]
    for entry in stats.values():
        counts = entry["counts"]
        if counts.get("failed"):
            entry["health"] = "failing"
        elif counts.get("pending") or counts.get("sending"):
            entry["health"] = "backlog" if entry["last_error"] else "ok"
        else:
            entry["health"] = "ok" if counts else "idle"
    return render_template("portal/admin/destinations.html", stats=stats,
                           ae_title=current_settings().ae_title)


# ------------------------------------------------------------------------------------------- audit log


@bp.route("/admin/audit", methods=["GET", "POST"])
@admin_required
def admin_audit() -> Any:
    """The audit log, newest first. Filters (which may include a patient ID) travel in a POST body."""
    src = request.form if request.method == "POST" else {}
    f = {k: (src.get(k, "") or "").strip()[:64] for k in ("action", "actor", "outcome", "patient_id",
                                                          "object_id", "date_from", "date_to")}
    try:
        page = max(1, int(src.get("page", "1") or 1))
    except ValueError:
        page = 1
    query = select(AuditEntry)
    if f["action"]:
        query = query.where(or_(AuditEntry.action == f["action"], AuditEntry.action.like(f["action"] + ".%")))
    if f["actor"]:
        query = query.where(AuditEntry.actor == f["actor"])
    if f["outcome"]:
        query = query.where(AuditEntry.outcome == f["outcome"])
    if f["patient_id"]:
        query = query.where(AuditEntry.patient_id == f["patient_id"])
    if f["object_id"]:
        query = query.where(AuditEntry.object_id == f["object_id"])
    for key, op in (("date_from", "ge"), ("date_to", "lt")):
        try:
            day = dt.date.fromisoformat(f[key]) if f[key] else None
        except ValueError:
            day = None
        if day is not None:
            if op == "lt":
                day += dt.timedelta(days=1)
            at = dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)
            query = query.where(AuditEntry.at >= at if op == "ge" else AuditEntry.at < at)
    with db_session() as s:
        total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = list(s.scalars(query.order_by(AuditEntry.id.desc()).offset((page - 1) * AUDIT_PAGE)
                              .limit(AUDIT_PAGE)))
        actions = [a for (a,) in s.execute(select(AuditEntry.action).distinct().order_by(AuditEntry.action))]
        if f["patient_id"]:
            audit_user(s, "audit.search", object_type="audit", patient_id=f["patient_id"])
    pages = max(1, (total + AUDIT_PAGE - 1) // AUDIT_PAGE)
    return render_template("portal/admin/audit.html", rows=rows, f=f, page=page, pages=pages, total=total,
                           actions=actions)


# ------------------------------------------------------------------------------------------- job queue


@bp.get("/admin/jobs")
@admin_required
def admin_jobs() -> Any:
    counts = jobq.counts(current_db())
    with db_session() as s:
        problem = list(s.scalars(select(Job).where(Job.state.in_(("failed", "rejected")))
                                 .order_by(Job.id.desc()).limit(50)))
        active = list(s.scalars(select(Job).where(Job.state.in_(("queued", "processing", "received")))
                                .order_by(Job.id).limit(50)))
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
    return render_template("portal/admin/jobs.html", counts=counts, states=jobq.STATES, problem=problem,
                           active=active, oldest=oldest, empty=EmptyForm())


@bp.post("/admin/jobs/<int:job_id>/retry")
@admin_required
def admin_retry_job(job_id: int) -> Any:
    try:
        jobq.retry_job(current_db(), job_id, actor=current_user.username)
    except jobq.JobError as exc:
        flash(str(exc), "error")
        return redirect(url_for("portal.admin_jobs"))
    with db_session() as s:
        audit_user(s, "admin.job.retry", object_type="job", object_id=job_id)
    flash(f"Job {job_id} is queued again.", "info")
    return redirect(url_for("portal.admin_jobs"))


@bp.post("/admin/jobs/retry-failed")
@admin_required
def admin_retry_failed() -> Any:
    n = jobq.requeue_failed(current_db(), actor=current_user.username)
    with db_session() as s:
        audit_user(s, "admin.job.retry_failed", object_type="job", detail={"count": n})
    flash(f"{n} failed job{'s' if n != 1 else ''} queued again.", "info")
    return redirect(url_for("portal.admin_jobs"))
