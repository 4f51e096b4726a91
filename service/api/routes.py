"""The ``/api/v1`` endpoints: thin functions over :mod:`service.ingest`, :mod:`service.access` and
:mod:`service.presenters`. Every read of patient data is written to the audit log."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
from pathlib import Path
from typing import Any

from flask import Response, jsonify, request, send_file, url_for
from sqlalchemy import ColumnElement, and_, exists, func, not_, or_, select
from sqlalchemy.orm import Session, aliased

from pipeline.taxonomy import FRACTURE_TYPES
from service.access import get_study_for, visible_studies
from service.api import bp
from service.api import idempotency as idem
from service.api.auth import Principal, principal, require_api_key
from service.audit import audit
from service.errors import Conflict, NotFound, ServiceError, Unprocessable, UnsupportedMediaType
from service.extensions import current_db, current_settings
from service.ingest import check_upload, ingest_spooled, spool_upload
from service.models import (
    AnalysisResult,
    Artifact,
    Feedback,
    Instance,
    Job,
    Patient,
    Series,
    Study,
)
from service.presenters import CALLS, STUDY_STATUSES, iso, job_dict, study_detail, study_summary

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_FILES = 20
FORM_FIELDS = {"patient_id": 64, "patient_name": 324, "referring_physician_name": 324}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


def _audit(session: Session, who: Principal, action: str, *, object_type: str | None = None,
           object_id: Any = None, patient_id: str | None = None, detail: dict[str, Any] | None = None) -> None:
    audit(session, actor_type="api_key", actor=who.actor, action=action, object_type=object_type,
          object_id=object_id, patient_id=patient_id, remote_addr=request.remote_addr, detail=detail)


def _patient_id(session: Session, study: Study) -> str | None:
    patient = session.get(Patient, study.patient_pk)
    return (patient.patient_id or None) if patient else None


def _study_links(study_id: int) -> dict[str, str]:
    return {"self": url_for("api.get_study", study_id=study_id)}


# ---------------------------------------------------------------------------------------------- submit


@bp.post("/studies")
@require_api_key
def submit_images() -> Any:
    """Submit one or more images (multipart/form-data); 202 with the studies and jobs created."""
    who = principal()
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the images as multipart/form-data (one or more 'file' parts)")
    uploads = [(field, f) for field, f in request.files.items(multi=True) if f is not None]
    if not uploads:
        raise Unprocessable("no file in the request: add one or more multipart parts named 'file'",
                            code="no_file")
    if len(uploads) > MAX_FILES:
        raise Unprocessable(f"at most {MAX_FILES} files per request", code="too_many_files")
    form: dict[str, str] = {}
    for name, limit in FORM_FIELDS.items():
        value = request.form.get(name, "").strip()
        if len(value) > limit or not value.isprintable():
            raise Unprocessable(f"{name} must be at most {limit} printable characters", code="invalid_field",
                                details={"field": name})
        form[name] = value
    db, settings = current_db(), current_settings()
    with contextlib.ExitStack() as spooled:  # every part's file in the incoming folder is removed on leaving
        # Each part is copied to a file of the incoming folder in 1 MiB pieces, hashed and size-checked as it
        # goes (service.ingest.spool_upload), never read whole into memory. Parsing the request does not hold
        # the parts either: Werkzeug gives each file part a SpooledTemporaryFile that moves, beyond 500 kB, to an
        # unnamed file in the incoming folder (service.app.UploadRequest, service.ingest.UploadPart; Werkzeug's
        # default is the system temporary folder), and MAX_CONTENT_LENGTH (the upload limit) bounds the whole
        # request. Closing a part once copied frees Werkzeug's copy before the request ends.
        payloads = []
        for field, f in uploads:
            filename, content_type = f.filename or None, f.mimetype or None
            upload = spooled.enter_context(spool_upload(settings, f.stream))
            f.close()
            # Refuse a request whose files are not all DICOM/PNG/JPEG before any of them is stored (the rule
            # service.ingest.ingest_spooled applies to each).
            check_upload(content_type, upload.kind, details={"filename": filename})
            payloads.append((field, filename, content_type, upload))

        key = request.headers.get("Idempotency-Key")
        if key is not None:
            key = idem.validate_key(key)
            # The SHA-256 of each part computed while spooling it: the same hex digest as of its bytes in memory,
            # so the request hash (and a client's retry across versions) is unchanged.
            digest = idem.request_hash(request, [(fld, name, ctype, upload.sha256)
                                                 for fld, name, ctype, upload in payloads])
            stored = idem.begin(db, who.prefix, key, digest)
            if stored is not None:
                return _submit_response(stored.body, stored.status_code, replayed=True)
        try:
            items = []
            for _field, filename, content_type, upload in payloads:
                result = ingest_spooled(
                    db, settings, upload, content_type=content_type, filename=filename,
                    uploaded_by_id=who.user.id, source="api", remote_addr=request.remote_addr,
                    patient_id=form["patient_id"], patient_name=form["patient_name"],
                    referring_physician_name=form["referring_physician_name"] or None,
                )
                items.append((filename, result))
            with db.session() as session:
                body = _submission_body(session, items)
        except BaseException:
            if key is not None:
                idem.release(db, who.prefix, key)
            raise
    if key is not None:
        idem.finish(db, who.prefix, key, 202, body)
    return _submit_response(body, 202, replayed=False)


def _submission_body(session: Session, items: list[tuple[str | None, Any]]) -> dict[str, Any]:
    out = []
    study_ids: list[int] = []
    for filename, result in items:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == result.study_instance_uid))
        assert study_id is not None
        if study_id not in study_ids:
            study_ids.append(study_id)
        out.append({
            "filename": filename,
            "study_id": study_id,
            "study_instance_uid": result.study_instance_uid,
            "instance_id": result.instance_pk,
            "sop_instance_uid": result.sop_instance_uid,
            "job_id": result.job_pk,
            "duplicate": result.duplicate,
            "status_url": url_for("api.get_study", study_id=study_id),
        })
    return {"study_ids": study_ids, "job_ids": [i["job_id"] for i in out if i["job_id"] is not None],
            "items": out, "location": url_for("api.get_study", study_id=study_ids[0])}


def _submit_response(body: dict[str, Any], status: int, *, replayed: bool) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Location"] = body["location"]
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


# ------------------------------------------------------------------------------------------------ list


def _encode_cursor(created_at: dt.datetime, study_id: int) -> str:
    raw = json.dumps([created_at.isoformat(), study_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, study_id = json.loads(raw)
        if not isinstance(study_id, int) or isinstance(study_id, bool) or not isinstance(created, str):
            raise ValueError("bad cursor")
        return dt.datetime.fromisoformat(created), study_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("cursor is not valid; use the next_cursor of a previous page", code="invalid_cursor",
                         details={"parameter": "cursor"}) from exc


def _parse_when(name: str, raw: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date or date-time", code="invalid_parameter",
                         details={"parameter": name}) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _for_column(session: Session, value: dt.datetime) -> dt.datetime:
    """SQLite stores our UTC timestamps naive; compare like with like."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite" and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    if bind.dialect.name != "sqlite" and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _study_instances(*columns: Any) -> Any:
    return (select(*columns).select_from(Instance).join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == Study.id))


def _latest_job_in(states: tuple[str, ...]) -> ColumnElement[bool]:
    later = aliased(Job)
    latest = select(func.max(later.id)).where(later.instance_pk == Job.instance_pk).scalar_subquery()
    return exists(_study_instances(Job.id).join(Job, Job.instance_pk == Instance.id)
                  .where(Job.state.in_(states), Job.id == latest))


def _status_clause(status: str) -> ColumnElement[bool]:
    if status == "received":
        return not_(exists(_study_instances(Job.id).join(Job, Job.instance_pk == Instance.id)))
    order = ["processing", "failed", "done", "rejected"]
    sets = {"processing": ("received", "queued", "processing"), "failed": ("failed",), "done": ("done",),
            "rejected": ("rejected",)}
    clauses = [_latest_job_in(sets[status])]
    clauses += [not_(_latest_job_in(sets[before])) for before in order[:order.index(status)]]
    return and_(*clauses)


def _latest_result_call(call: str) -> ColumnElement[bool]:
    later = aliased(AnalysisResult)
    latest = select(func.max(later.id)).where(later.instance_pk == AnalysisResult.instance_pk).scalar_subquery()
    return exists(_study_instances(AnalysisResult.id).join(AnalysisResult, AnalysisResult.instance_pk == Instance.id)
                  .where(AnalysisResult.detection_call == call, AnalysisResult.id == latest))


def _result_clause(call: str) -> ColumnElement[bool]:
    clauses = [_latest_result_call(call)]
    clauses += [not_(_latest_result_call(before)) for before in CALLS[:CALLS.index(call)]]
    return and_(*clauses)


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}", code="invalid_parameter",
                         details={"parameter": name})
    return value


@bp.get("/studies")
@require_api_key
def list_studies() -> Any:
    """The caller's visible studies, newest first, with filters and cursor pagination."""
    who = principal()
    raw_limit = request.args.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", code="invalid_parameter",
                         details={"parameter": "limit"})
    status = _choice("status", STUDY_STATUSES)
    result = _choice("result", CALLS)
    with current_db().session() as session:
        query = visible_studies(session, who.user)
        if status:
            query = query.where(_status_clause(status))
        if result:
            query = query.where(_result_clause(result))
        if patient_id := request.args.get("patient_id"):
            query = query.where(Study.patient_pk.in_(select(Patient.id).where(Patient.patient_id == patient_id)))
        if accession := request.args.get("accession"):
            query = query.where(Study.accession_number == accession)
        if since := request.args.get("since"):
            query = query.where(Study.created_at >= _for_column(session, _parse_when("since", since)))
        if until := request.args.get("until"):
            query = query.where(Study.created_at < _for_column(session, _parse_when("until", until)))
        if cursor := request.args.get("cursor"):
            created, last_id = _decode_cursor(cursor)
            created = _for_column(session, created)
            query = query.where(or_(Study.created_at < created, and_(Study.created_at == created,
                                                                     Study.id < last_id)))
        studies = session.scalars(query.order_by(Study.created_at.desc(), Study.id.desc()).limit(limit + 1)).all()
        page, more = studies[:limit], len(studies) > limit
        items = []
        for study in page:
            row = study_summary(session, study)
            row["links"] = _study_links(study.id)
            items.append(row)
        next_cursor = _encode_cursor(page[-1].created_at, page[-1].id) if more else None
        _audit(session, who, "study.list", object_type="study",
               detail={"count": len(items), "study_ids": [s.id for s in page],
                       "filters": {k: v for k, v in request.args.items() if k != "cursor"}})
    return jsonify({"items": items, "next_cursor": next_cursor, "limit": limit})


# ---------------------------------------------------------------------------------------------- detail


def _with_links(detail: dict[str, Any]) -> dict[str, Any]:
    study_id = detail["id"]
    detail["links"] = _study_links(study_id)
    if detail["available"]["sr"]:
        detail["links"]["sr"] = url_for("api.download_sr", study_id=study_id)
    for instance in detail["instances"]:
        links = {}
        for name, endpoint in (("original", "download_original"), ("heatmap", "download_heatmap"),
                               ("hybrid", "download_hybrid"), ("edges", "download_edges"),
                               ("sc", "download_sc")):
            if instance["available"][name]:
                links[name] = url_for(f"api.{endpoint}", study_id=study_id, instance_id=instance["id"])
        if instance["result"] is not None:
            links["feedback"] = url_for("api.submit_feedback", study_id=study_id, instance_id=instance["id"])
        instance["links"] = links
    return detail


@bp.get("/studies/<int:study_id>")
@require_api_key
def get_study(study_id: int) -> Any:
    """One study: status, jobs and their timelines, results, artifacts and deliveries."""
    who = principal()
    with current_db().session() as session:
        study = get_study_for(session, who.user, study_id)
        detail = _with_links(study_detail(session, study))
        _audit(session, who, "study.read", object_type="study", object_id=study.id,
               patient_id=_patient_id(session, study))
    return jsonify(detail)


@bp.get("/jobs/<int:job_id>")
@require_api_key
def get_job(job_id: int) -> Any:
    """One job's state and timeline (visible when its study is)."""
    who = principal()
    with current_db().session() as session:
        job = session.get(Job, job_id) if job_id < 2**63 else None
        study_pk = None
        if job is not None:
            study_pk = session.scalar(select(Series.study_pk).join(Instance, Instance.series_pk == Series.id)
                                      .where(Instance.id == job.instance_pk))
        if job is None or study_pk is None:
            raise NotFound(f"job {job_id} not found")
        try:
            study = get_study_for(session, who.user, study_pk)
        except NotFound:
            raise NotFound(f"job {job_id} not found") from None
        body = job_dict(session, job)
        body["study_id"] = study.id
        body["links"] = {"study": url_for("api.get_study", study_id=study.id)}
        _audit(session, who, "job.read", object_type="job", object_id=job.id,
               patient_id=_patient_id(session, study))
    return jsonify(body)


# ------------------------------------------------------------------------------------------- downloads


def _instance_of(session: Session, study: Study, instance_id: int) -> Instance:
    instance = session.get(Instance, instance_id) if instance_id < 2**63 else None
    if instance is not None:
        series = session.get(Series, instance.series_pk)
        if series is not None and series.study_pk == study.id:
            return instance
    raise NotFound(f"instance {instance_id} not found in study {study.id}")


def _latest_result(session: Session, instance: Instance) -> AnalysisResult | None:
    return session.scalars(select(AnalysisResult).where(AnalysisResult.instance_pk == instance.id)
                           .order_by(AnalysisResult.id.desc()).limit(1)).first()


#: Files up to this size are read into the response; larger ones (big originals) are streamed.
BUFFER_LIMIT = 16 * 1024 * 1024


def _send(path: str | None, mimetype: str, name: str, what: str) -> Response:
    file = Path(path) if path else None
    if file is None or not file.is_file():
        raise NotFound(f"{what} is not available (yet)")
    if file.stat().st_size > BUFFER_LIMIT:
        return send_file(file.resolve(), mimetype=mimetype, as_attachment=True, download_name=name, max_age=0)
    response = Response(file.read_bytes(), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


def _download(study_id: int, instance_id: int, kind: str) -> Response:
    who = principal()
    with current_db().session() as session:
        study = get_study_for(session, who.user, study_id)
        instance = _instance_of(session, study, instance_id)
        path: str | None
        if kind == "original":
            path, mimetype, name = instance.file_path, "application/dicom", f"{instance.sop_instance_uid}.dcm"
        elif kind == "sc":
            artifact = session.scalars(select(Artifact).where(Artifact.instance_pk == instance.id,
                                                              Artifact.kind == "sc")
                                       .order_by(Artifact.id.desc()).limit(1)).first()
            path = artifact.file_path if artifact else None
            mimetype = "application/dicom"
            name = f"{artifact.sop_instance_uid if artifact else instance.id}-sc.dcm"
        else:
            result = _latest_result(session, instance)
            path = getattr(result, f"{kind}_path") if result is not None else None
            mimetype, name = "image/png", f"{instance.sop_instance_uid}-{kind}.png"
        response = _send(path, mimetype, name, f"the {kind} of instance {instance.id}")
        _audit(session, who, f"download.{kind}", object_type="instance", object_id=instance.id,
               patient_id=_patient_id(session, study), detail={"study_id": study.id})
    return response


@bp.get("/studies/<int:study_id>/instances/<int:instance_id>/original")
@require_api_key
def download_original(study_id: int, instance_id: int) -> Any:
    return _download(study_id, instance_id, "original")


@bp.get("/studies/<int:study_id>/instances/<int:instance_id>/heatmap.png")
@require_api_key
def download_heatmap(study_id: int, instance_id: int) -> Any:
    return _download(study_id, instance_id, "heatmap")


@bp.get("/studies/<int:study_id>/instances/<int:instance_id>/hybrid.png")
@require_api_key
def download_hybrid(study_id: int, instance_id: int) -> Any:
    return _download(study_id, instance_id, "hybrid")


@bp.get("/studies/<int:study_id>/instances/<int:instance_id>/edges.png")
@require_api_key
def download_edges(study_id: int, instance_id: int) -> Any:
    return _download(study_id, instance_id, "edges")


@bp.get("/studies/<int:study_id>/instances/<int:instance_id>/sc.dcm")
@require_api_key
def download_sc(study_id: int, instance_id: int) -> Any:
    return _download(study_id, instance_id, "sc")


@bp.get("/studies/<int:study_id>/sr.dcm")
@require_api_key
def download_sr(study_id: int) -> Any:
    who = principal()
    with current_db().session() as session:
        study = get_study_for(session, who.user, study_id)
        artifact = session.scalars(select(Artifact).where(Artifact.study_pk == study.id, Artifact.kind == "sr")
                                   .order_by(Artifact.id.desc()).limit(1)).first()
        response = _send(artifact.file_path if artifact else None, "application/dicom",
                         f"{artifact.sop_instance_uid if artifact else study.id}-sr.dcm",
                         f"the structured report of study {study.id}")
        _audit(session, who, "download.sr", object_type="study", object_id=study.id,
               patient_id=_patient_id(session, study))
    return response


# -------------------------------------------------------------------------------------------- feedback


def _json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the feedback as application/json")
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("the body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object", code="validation_failed")
    return body


def _validate_feedback(body: dict[str, Any]) -> dict[str, Any]:
    problems: dict[str, str] = {}
    allowed = {"agrees", "fracture_present", "correct_type", "comment"}
    for extra in sorted(set(body) - allowed):
        problems[extra] = "unknown field"
    agrees = body.get("agrees")
    if not isinstance(agrees, bool):
        problems["agrees"] = "required, true or false"
    present = body.get("fracture_present")
    if present is not None and not isinstance(present, bool):
        problems["fracture_present"] = "true, false or null"
    correct_type = body.get("correct_type")
    if correct_type is not None and correct_type not in FRACTURE_TYPES:
        problems["correct_type"] = f"one of {', '.join(FRACTURE_TYPES)} or null"
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
        problems["comment"] = "a string of at most 2000 characters, or null"
    if problems:
        raise Unprocessable("the feedback is not valid", code="validation_failed", details=problems)
    return {"agrees": agrees, "fracture_present": present, "correct_type": correct_type, "comment": comment}


@bp.post("/studies/<int:study_id>/instances/<int:instance_id>/feedback")
@require_api_key
def submit_feedback(study_id: int, instance_id: int) -> Any:
    """A clinician's agreement or correction on the instance's latest result."""
    who = principal()
    values = _validate_feedback(_json_body())
    with current_db().session() as session:
        study = get_study_for(session, who.user, study_id)
        instance = _instance_of(session, study, instance_id)
        result = _latest_result(session, instance)
        if result is None:
            raise Conflict(f"instance {instance.id} has no result yet to give feedback on", code="no_result")
        feedback = Feedback(result_pk=result.id, user_id=who.user.id, **values)
        session.add(feedback)
        session.flush()
        _audit(session, who, "feedback.create", object_type="result", object_id=result.id,
               patient_id=_patient_id(session, study), detail={"feedback_id": feedback.id})
        body = {"id": feedback.id, "result_id": result.id, "instance_id": instance.id, "study_id": study.id,
                **values, "created_at": iso(feedback.created_at)}
    return jsonify(body), 201


# ---------------------------------------------------------------------------------------------- models


@bp.get("/models")
@require_api_key
def list_models() -> Any:
    """The model bundles this node runs, from their cards (no weights are loaded here)."""
    from service.api.models_info import read_model_cards

    settings = current_settings()
    # mirror_look: whether a reader card's mirrored look is used (FRACTURE_MIRROR_LOOK; off: its single_reading fit)
    return jsonify({"model_dir": settings.model_dir.name, "mirror_look": settings.mirror_look,
                    "models": read_model_cards(settings.model_dir)})
