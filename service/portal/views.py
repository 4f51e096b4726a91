"""History, study view, image layers, live status, patient reveal, upload and feedback.

Patient data never appears in a URL: pages are addressed by numeric study, instance and result ids, and
the history search (patient ID or accession number) is a POST form whose results are rendered directly.
Every view of patient data (the history list, a study, an image, a reveal) writes an audit row, and every
object is looked up through :mod:`service.access`, so a study another clinician owns answers 404.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
from flask import Response, abort, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from pipeline.taxonomy import FRACTURE_TYPES
from service.access import get_study_for, visible_studies
from service.errors import ServiceError
from service.extensions import current_db, current_settings
from service.models import AnalysisResult, Feedback, Instance, Patient, Series, Study, User, utcnow
from service.portal import bp
from service.portal.common import (
    audit_user,
    call_label,
    db_session,
    display_name,
    fmt_da,
    fmt_time,
    mask_id,
    mask_name,
    me,
    pct,
    type_label,
)
from service.portal.forms import FeedbackForm
from service.presenters import STUDY_STATUSES, study_detail, study_summary

PAGE_SIZE = 20
#: History filters on derived status/result scan at most this many of the newest matching studies.
MAX_SCAN = 2000
IMAGE_KINDS = ("original", "edges", "heatmap", "hybrid")
MAX_ORIGINAL_SIDE = 2048


@bp.app_template_filter("when")
def _when(value: Any) -> str:
    return fmt_time(value)


@bp.app_template_filter("when_s")
def _when_s(value: Any) -> str:
    return fmt_time(value, with_seconds=True)


@bp.app_template_filter("da")
def _da(value: str | None) -> str:
    return fmt_da(value)


@bp.app_template_filter("pct")
def _pct(value: float | None, digits: int = 0) -> str:
    return pct(value, digits)


@bp.app_template_filter("type_label")
def _type_label(value: str | None) -> str:
    return type_label(value)


@bp.app_template_filter("call_label")
def _call_label(value: str | None) -> str:
    return call_label(value)


@bp.app_template_filter("mask_name")
def _mask_name(value: str | None) -> str:
    return mask_name(value)


@bp.app_template_filter("mask_id")
def _mask_id(value: str | None) -> str:
    return mask_id(value)


@bp.app_template_filter("person")
def _person(value: str | None) -> str:
    return display_name(value)


# --------------------------------------------------------------------------------------------- history


def _parse_date(raw: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


def _filters(source: Any) -> dict[str, Any]:
    status = source.get("status", "")
    result = source.get("result", "")
    try:
        page = max(1, int(source.get("page", "1") or 1))
    except ValueError:
        page = 1
    return {
        "q": (source.get("q", "") or "").strip()[:64],
        "status": status if status in STUDY_STATUSES else "",
        "result": result if result in ("fracture", "indeterminate", "no_fracture", "none") else "",
        "date_from": _parse_date(source.get("date_from")),
        "date_to": _parse_date(source.get("date_to")),
        "page": page,
    }


def _extras(session: Session, study_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Body region (first series) and the top type of the most suspicious image, per study."""
    out: dict[int, dict[str, Any]] = {sid: {"body_part": None, "top_type": None, "top_type_probability": None}
                                      for sid in study_ids}
    if not study_ids:
        return out
    for study_pk, body_part in session.execute(
            select(Series.study_pk, Series.body_part).where(Series.study_pk.in_(study_ids)).order_by(Series.id)):
        if out[study_pk]["body_part"] is None and body_part:
            out[study_pk]["body_part"] = body_part
    rows = session.execute(
        select(Series.study_pk, AnalysisResult)
        .join(Instance, Instance.series_pk == Series.id)
        .join(AnalysisResult, AnalysisResult.instance_pk == Instance.id)
        .where(Series.study_pk.in_(study_ids)).order_by(AnalysisResult.id)).all()
    best: dict[int, float] = {}
    for study_pk, result in rows:
        p = result.fracture_probability if result.fracture_probability is not None else -1.0
        if result.top_type and result.detection_call != "no_fracture" and p >= best.get(study_pk, -2.0):
            best[study_pk] = p
            out[study_pk]["top_type"] = result.top_type
            out[study_pk]["top_type_probability"] = result.top_type_probability
    return out


def history_rows(session: Session, filters: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The page of study rows the signed-in user may see that match ``filters``, and the total count."""
    query = visible_studies(session, me()).join(Patient, Patient.id == Study.patient_pk)
    if filters["q"]:
        q = filters["q"].lower()
        query = query.where(or_(func.lower(Patient.patient_id) == q, func.lower(Study.accession_number) == q))
    if filters["date_from"]:
        start = dt.datetime.combine(filters["date_from"], dt.time.min, tzinfo=dt.UTC)
        query = query.where(Study.created_at >= start)
    if filters["date_to"]:
        end = dt.datetime.combine(filters["date_to"] + dt.timedelta(days=1), dt.time.min, tzinfo=dt.UTC)
        query = query.where(Study.created_at < end)
    query = query.order_by(Study.created_at.desc(), Study.id.desc())
    start = (filters["page"] - 1) * PAGE_SIZE
    if not filters["status"] and not filters["result"]:
        total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
        studies = list(session.scalars(query.offset(start).limit(PAGE_SIZE)))
        summaries = [study_summary(session, s) for s in studies]
    else:  # status and result are derived from jobs and results: filter the summaries
        summaries = []
        for study in session.scalars(query.limit(MAX_SCAN)):
            summary = study_summary(session, study)
            if filters["status"] and summary["status"] != filters["status"]:
                continue
            if filters["result"] and (summary["result"] or "none") != filters["result"]:
                continue
            summaries.append(summary)
        total = len(summaries)
        summaries = summaries[start:start + PAGE_SIZE]
    extras = _extras(session, [s["id"] for s in summaries])
    for summary in summaries:
        summary.update(extras[summary["id"]])
    return summaries, total


@bp.route("/history", methods=["GET", "POST"])
@login_required
def history() -> Any:
    """The studies this user may see. Filters arrive in a POST body (so a patient ID never sits in a URL)."""
    filters = _filters(request.form if request.method == "POST" else {})
    with db_session() as s:
        rows, total = history_rows(s, filters)
        audit_user(s, "study.list", object_type="study",
                   detail={"studies": [r["id"] for r in rows], "searched": bool(filters["q"]),
                           "page": filters["page"]})
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    return render_template("portal/history.html", rows=rows, total=total, pages=pages, filters=filters,
                           statuses=STUDY_STATUSES)


def _status_payload(summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": summary["id"], "status": summary["status"], "result": summary["result"],
            "result_label": call_label(summary["result"]) if summary["result"] else "—",
            "probability": summary["max_fracture_probability"],
            "probability_label": pct(summary["max_fracture_probability"]),
            "top_type_label": type_label(extra.get("top_type")), "instances": summary["instance_count"]}


@bp.get("/history/status")
@login_required
def history_status() -> Any:
    """Live status of the given studies (``?ids=1,2,3``; ids only, at most 100) for the history poller."""
    ids = [int(x) for x in request.args.get("ids", "").split(",") if x.strip().isdigit()][:100]
    with db_session() as s:
        studies = list(s.scalars(visible_studies(s, me()).where(Study.id.in_(ids)))) if ids else []
        extras = _extras(s, [st.id for st in studies])
        items = [_status_payload(study_summary(s, st), extras[st.id]) for st in studies]
    return jsonify({"studies": items})


@bp.post("/studies/<int:study_id>/reveal")
@login_required
def reveal(study_id: int) -> Any:
    """The unmasked patient ID and name of one study (audited). POST with the CSRF token."""
    with db_session() as s:
        study = get_study_for(s, me(), study_id)
        patient = s.get(Patient, study.patient_pk)
        pid = patient.patient_id if patient else None
        audit_user(s, "patient.reveal", object_type="study", object_id=study.id, patient_id=pid)
        return jsonify({"patient_id": pid or "—", "patient_name": display_name(patient.name if patient else None)
                        or "—"})


# ----------------------------------------------------------------------------------------------- study


def _feedback_for(session: Session, result_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    if not result_ids:
        return out
    rows = session.execute(select(Feedback, User.username, User.display_name)
                           .join(User, User.id == Feedback.user_id)
                           .where(Feedback.result_pk.in_(result_ids)).order_by(Feedback.id)).all()
    for fb, username, name in rows:
        out.setdefault(fb.result_pk, []).append({
            "agrees": fb.agrees, "fracture_present": fb.fracture_present, "correct_type": fb.correct_type,
            "comment": fb.comment, "by": name or username, "at": fb.created_at})
    return out


def _timeline(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's processing timeline: received, each job transition, SR/SC objects and their deliveries."""
    events: list[dict[str, Any]] = []
    for number, inst in enumerate(detail["instances"], start=1):
        events.append({"at": inst["received_at"], "what": f"Image {number} received",
                       "detail": inst.get("source") or "", "state": "received"})
        for job in inst["jobs"]:
            for ev in job["timeline"]:
                if ev["state"] == "received":
                    continue
                label = {"queued": "queued for analysis", "processing": "analysis started", "done": "analysed",
                         "rejected": "rejected", "failed": "analysis failed"}.get(ev["state"], ev["state"])
                events.append({"at": ev["at"], "what": f"Image {number} {label}", "detail": ev["detail"] or "",
                               "state": ev["state"]})
    for art in detail["artifacts"]:
        kind = {"sc": "Secondary Capture", "sr": "Structured Report"}.get(art["kind"], art["kind"].upper())
        events.append({"at": art["created_at"], "what": f"{kind} created", "detail": "", "state": "created"})
        for d in art["deliveries"]:
            if d["state"] == "delivered":
                events.append({"at": d["delivered_at"], "what": f"{kind} delivered to {d['destination']}",
                               "detail": "", "state": "delivered"})
            else:
                events.append({"at": d["next_attempt_at"] or art["created_at"],
                               "what": f"{kind} to {d['destination']}: {d['state']}",
                               "detail": (d["last_error"] or "")[:200], "state": d["state"]})
    events.sort(key=lambda e: e["at"] or "")
    return events


def load_study(session: Session, study_id: int) -> tuple[Study, dict[str, Any]]:
    study = get_study_for(session, me(), study_id)
    detail = study_detail(session, study)
    result_ids = [i["result"]["id"] for i in detail["instances"] if i["result"]]
    feedback = _feedback_for(session, result_ids)
    for inst in detail["instances"]:
        inst["feedback"] = feedback.get(inst["result"]["id"], []) if inst["result"] else []
    detail["timeline"] = _timeline(detail)
    return study, detail


@bp.get("/studies/<int:study_id>")
@login_required
def study(study_id: int) -> Any:
    with db_session() as s:
        _study, detail = load_study(s, study_id)
        audit_user(s, "study.view", object_type="study", object_id=study_id,
                   patient_id=detail["patient"]["patient_id"])
    return render_template("portal/study.html", d=detail, form=FeedbackForm(), types=FRACTURE_TYPES)


@bp.get("/studies/<int:study_id>/status")
@login_required
def study_status(study_id: int) -> Any:
    """Status of one study and its images (the study and upload pages poll it); ids and states only."""
    with db_session() as s:
        study = get_study_for(s, me(), study_id)
        detail = study_detail(s, study)
    return jsonify({
        "id": detail["id"], "status": detail["status"], "result": detail["result"],
        "result_label": call_label(detail["result"]) if detail["result"] else "—",
        "probability": detail["max_fracture_probability"],
        "images": [{"id": i["id"], "status": i["status"],
                    "reason": (i["job"] or {}).get("reason") or (i["job"] or {}).get("error"),
                    "call": (i["result"] or {}).get("call")} for i in detail["instances"]],
    })


def _instance_of(session: Session, study: Study, instance_id: int) -> Instance:
    instance = session.scalar(select(Instance).join(Series, Series.id == Instance.series_pk)
                              .where(Instance.id == instance_id, Series.study_pk == study.id))
    if instance is None:
        abort(404)
    return instance


def render_original_png(path: str | Path, max_side: int = MAX_ORIGINAL_SIDE) -> bytes:
    """The stored instance as an 8-bit display PNG (modality LUT, window, MONOCHROME1 inverted)."""
    import cv2  # here, not at the top: the web process loads OpenCV only once an image is shown

    from dicom.image import radiograph_from_dataset, read_dataset

    radiograph = radiograph_from_dataset(read_dataset(str(path)))
    if radiograph.rgb is not None:
        image = cv2.cvtColor(radiograph.rgb, cv2.COLOR_RGB2BGR)
    else:
        image = np.clip(radiograph.pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def heatmap_overlay_png(data: bytes) -> bytes:
    """The worker's colour-mapped (JET) heatmap as RGBA with cold regions transparent, so that it can lie
    over the original: the heat is read back from the hue (blue 0 .. red 1) and becomes the alpha."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return data
    hue = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 0].astype(np.float32)  # OpenCV hue: 0..180
    heat = np.clip((120.0 - np.minimum(hue, 120.0)) / 120.0, 0.0, 1.0)
    alpha = np.clip((heat - 0.15) / 0.6, 0.0, 1.0)
    rgba = np.dstack([image, (alpha * 255.0 + 0.5).astype(np.uint8)])
    ok, encoded = cv2.imencode(".png", rgba)
    return encoded.tobytes() if ok else data


def image_bytes(session: Session, instance: Instance, kind: str) -> bytes:
    if kind == "original":
        try:
            return render_original_png(instance.file_path)
        except (OSError, ValueError):
            abort(404)
    result = session.scalar(select(AnalysisResult).where(AnalysisResult.instance_pk == instance.id)
                            .order_by(AnalysisResult.id.desc()).limit(1))
    path = getattr(result, f"{kind}_path", None) if result is not None else None
    if not path or not Path(path).is_file():
        abort(404)
    return Path(path).read_bytes()


@bp.get("/studies/<int:study_id>/images/<int:instance_id>/<kind>.png")
@login_required
def image(study_id: int, instance_id: int, kind: str) -> Any:
    """One image layer of one instance: ``original``, ``edges``, ``heatmap`` or ``hybrid`` (audited)."""
    if kind not in IMAGE_KINDS:
        abort(404)
    with db_session() as s:
        study = get_study_for(s, me(), study_id)
        instance = _instance_of(s, study, instance_id)
        data = image_bytes(s, instance, kind)
        if kind == "heatmap":
            data = heatmap_overlay_png(data)
        patient = s.get(Patient, study.patient_pk)
        audit_user(s, "image.view", object_type="instance", object_id=instance.id,
                   patient_id=patient.patient_id if patient else None, detail={"layer": kind})
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "private, no-store"
    return response


# ---------------------------------------------------------------------------------------------- upload


@bp.get("/upload")
@login_required
def upload_page() -> Any:
    return render_template("portal/upload.html", max_mb=current_settings().max_upload_mb)


@bp.post("/upload")
@login_required
def upload() -> Any:
    """One file per request (the page sends each file on its own, with progress): JSON
    ``{ok, study_id, error, filename}``. DICOM carries its own patient data; for PNG/JPEG the optional
    patient ID and name fields fill the Secondary Capture header."""
    from service.ingest import ingest_upload

    try:
        upload_file = request.files.get("file")
    except RequestEntityTooLarge:
        return _upload_error(None, f"too large: the limit is {current_settings().max_upload_mb} MB", 413)
    except ServiceError as exc:  # a disk that fills while Werkzeug writes the file (service.app.UploadRequest)
        return _upload_error(None, exc.message, exc.status)
    if upload_file is None or not upload_file.filename:
        return _upload_error(None, "no file was sent", 400)
    filename = Path(upload_file.filename).name[:256]
    user = me()
    try:
        result = ingest_upload(current_db(), current_settings(), upload_file.stream,
                               content_type=upload_file.mimetype, filename=filename, uploaded_by_id=user.id,
                               remote_addr=request.remote_addr,
                               patient_id=request.form.get("patient_id", "").strip()[:64],
                               patient_name=request.form.get("patient_name", "").strip()[:64],
                               referring_physician_name=user.referring_physician_name)
    except ServiceError as exc:
        return _upload_error(filename, exc.message, exc.status)
    with db_session() as s:
        study_pk = s.scalar(select(Series.study_pk).join(Instance, Instance.series_pk == Series.id)
                            .where(Instance.id == result.instance_pk))
    return jsonify({"ok": True, "study_id": study_pk, "instance_id": result.instance_pk,
                    "duplicate": result.duplicate, "filename": filename,
                    "study_url": url_for("portal.study", study_id=study_pk), "error": None})


def _upload_error(filename: str | None, message: str, status: int) -> Any:
    response = jsonify({"ok": False, "study_id": None, "filename": filename, "error": message})
    response.status_code = status
    return response


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(_exc: RequestEntityTooLarge) -> Any:
    if request.endpoint == "portal.upload":
        return _upload_error(None, f"too large: the limit is {current_settings().max_upload_mb} MB", 413)
    return "Request too large", 413


# -------------------------------------------------------------------------------------------- feedback


@bp.post("/studies/<int:study_id>/results/<int:result_id>/feedback")
@login_required
def feedback(study_id: int, result_id: int) -> Any:
    """A clinician's agreement with, or correction of, one result: who, when, what."""
    form = FeedbackForm()
    with db_session() as s:
        study = get_study_for(s, me(), study_id)
        result = s.scalar(select(AnalysisResult).join(Instance, Instance.id == AnalysisResult.instance_pk)
                          .join(Series, Series.id == Instance.series_pk)
                          .where(AnalysisResult.id == result_id, Series.study_pk == study.id))
        if result is None:
            abort(404)
        if not form.validate_on_submit():
            abort(400, "the feedback form is incomplete")
        agrees = form.verdict.data == "agree"
        present: bool | None
        if form.fracture_present.data in ("yes", "no"):
            present = form.fracture_present.data == "yes"
        elif agrees and result.detection_call in ("fracture", "no_fracture"):
            present = result.detection_call == "fracture"
        else:
            present = None
        correct_type = form.correct_type.data or None
        if correct_type is None and agrees and present and result.top_type:
            correct_type = result.top_type
        if present is False:
            correct_type = None
        fb = Feedback(result_pk=result.id, user_id=me().id, agrees=agrees, fracture_present=present,
                      correct_type=correct_type, comment=(form.comment.data or "").strip() or None,
                      created_at=utcnow())
        s.add(fb)
        s.flush()
        patient = s.get(Patient, study.patient_pk)
        audit_user(s, "feedback.create", object_type="result", object_id=result.id,
                   patient_id=patient.patient_id if patient else None,
                   detail={"feedback_id": fb.id, "agrees": agrees, "fracture_present": present,
                           "correct_type": correct_type})
        instance_pk = result.instance_pk
    return redirect(url_for("portal.study", study_id=study_id, _anchor=f"image-{instance_pk}"))


@bp.app_context_processor
def _portal_context() -> dict[str, Any]:
    return {"current_user": current_user, "disclaimer": "Research use only. Not for diagnostic use."}
