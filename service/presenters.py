"""Studies as plain dictionaries: the one view of a study shared by the REST API (as JSON) and the portal
(in its templates).

:func:`study_summary` is a list row: identifiers, patient, dates, the aggregate status of the study's jobs and
its aggregate call. :func:`study_detail` adds every instance with its jobs (state and timeline), its latest
analysis result (validity, probability, operating point, call, type distribution, peak box, the models that
made it and the not-for-diagnostic-use statement), and the study's generated artifacts with their deliveries.

Timestamps are ISO 8601 strings in UTC. Nothing here knows about URLs; callers add their own links.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import AnalysisResult, Artifact, Delivery, Instance, Job, JobEvent, Patient, Series, Study

DISCLAIMER = "Research use only. Not for diagnostic use."

#: Job states that are not finished yet.
ACTIVE_JOB_STATES = ("received", "queued", "processing")
#: Study status, derived from its jobs (see :func:`study_status`).
STUDY_STATUSES = ("received", "processing", "failed", "done", "rejected")
#: Detection calls, and the study's aggregate call (the most severe of its instances').
CALLS = ("fracture", "indeterminate", "no_fracture")


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands back naive datetimes that were stored as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def study_status(job_states: list[str]) -> str:
    """``processing`` while any job is unfinished, else ``failed`` if any failed, else ``done`` if any
    finished with a result, else ``rejected`` (all refused by validation); ``received`` with no job."""
    if not job_states:
        return "received"
    if any(state in ACTIVE_JOB_STATES for state in job_states):
        return "processing"
    for status in ("failed", "done", "rejected"):
        if status in job_states:
            return status
    return "processing"


def aggregate_call(calls: list[str | None]) -> str | None:
    """The study's call: ``fracture`` if any image shows one, else ``indeterminate``, else ``no_fracture``."""
    for call in CALLS:
        if call in calls:
            return call
    return None


def _instances(session: Session, study: Study) -> list[tuple[Instance, Series]]:
    rows = session.execute(
        select(Instance, Series).join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    ).all()
    return [(row[0], row[1]) for row in rows]


def _latest_results(session: Session, instance_ids: list[int]) -> dict[int, AnalysisResult]:
    if not instance_ids:
        return {}
    latest = (select(func.max(AnalysisResult.id)).where(AnalysisResult.instance_pk.in_(instance_ids))
              .group_by(AnalysisResult.instance_pk))
    results = session.scalars(select(AnalysisResult).where(AnalysisResult.id.in_(latest))).all()
    return {result.instance_pk: result for result in results}


def _jobs(session: Session, instance_ids: list[int]) -> dict[int, list[Job]]:
    out: dict[int, list[Job]] = {}
    if not instance_ids:
        return out
    for job in session.scalars(select(Job).where(Job.instance_pk.in_(instance_ids)).order_by(Job.id)):
        out.setdefault(job.instance_pk, []).append(job)
    return out


def _patient(session: Session, study: Study) -> dict[str, Any]:
    patient = session.get(Patient, study.patient_pk)
    if patient is None:
        return {"patient_id": None, "issuer": None, "name": None, "birth_date": None, "sex": None}
    return {"patient_id": patient.patient_id or None, "issuer": patient.issuer or None,
            "name": patient.name or None, "birth_date": patient.birth_date, "sex": patient.sex}


def study_summary(session: Session, study: Study) -> dict[str, Any]:
    """A study as a list row (identifiers, patient, dates, status, call, counts)."""
    pairs = _instances(session, study)
    instance_ids = [instance.id for instance, _ in pairs]
    jobs = _jobs(session, instance_ids)
    results = _latest_results(session, instance_ids)
    latest_states = [job_list[-1].state for job_list in jobs.values() if job_list]
    calls = [result.detection_call for result in results.values()]
    probabilities = [r.fracture_probability for r in results.values() if r.fracture_probability is not None]
    return {
        "id": study.id,
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number or None,
        "study_date": study.study_date or None,
        "study_time": study.study_time or None,
        "description": study.description or None,
        "referring_physician_name": study.referring_physician_name or None,
        "patient": _patient(session, study),
        "source": study.source,
        "calling_ae": study.calling_ae,
        "status": study_status(latest_states),
        "result": aggregate_call(calls),
        "max_fracture_probability": max(probabilities) if probabilities else None,
        "instance_count": len(pairs),
        "report_state": study.report_state,
        "created_at": iso(study.created_at),
        "last_instance_at": iso(study.last_instance_at),
        "reported_at": iso(study.reported_at),
    }


def job_dict(session: Session, job: Job) -> dict[str, Any]:
    """A job with its state and its timeline (every transition, oldest first)."""
    events = session.scalars(select(JobEvent).where(JobEvent.job_pk == job.id).order_by(JobEvent.id)).all()
    return {
        "id": job.id,
        "instance_id": job.instance_pk,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "reason": job.reason,
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "timeline": [{"state": e.state, "at": iso(e.at), "detail": e.detail} for e in events],
    }


def _file_exists(path: str | None) -> bool:
    return bool(path) and Path(str(path)).is_file()


def result_dict(result: AnalysisResult) -> dict[str, Any]:
    """What the pipeline concluded about one image, which models said so, and the disclaimer."""
    models = [m for m in (result.models or []) if isinstance(m, dict)]
    return {
        "id": result.id,
        "job_id": result.job_pk,
        "validity": {"is_radiograph": result.is_radiograph, "score": result.validity_score,
                     "reason": result.validity_reason or ""},
        "fracture_probability": result.fracture_probability,
        "operating_point": result.operating_point,
        "call": result.detection_call,
        "top_type": result.top_type,
        "top_type_probability": result.top_type_probability,
        "type_distribution": result.type_distribution,
        "peak_box": result.peak_box,
        "pixel_spacing_mm": result.pixel_spacing_mm,
        "model": {"name": result.model_name, "version": result.model_version},
        "models": [{"name": str(m.get("name", "")), "version": str(m.get("version", "")),
                    "sha256": m.get("sha256"), "task": m.get("task")} for m in models],
        "explanations": {"heatmap": _file_exists(result.heatmap_path), "edges": _file_exists(result.edges_path),
                         "hybrid": _file_exists(result.hybrid_path)},
        "created_at": iso(result.created_at),
        "disclaimer": DISCLAIMER,
    }


def _artifacts(session: Session, study: Study) -> list[dict[str, Any]]:
    artifacts = session.scalars(select(Artifact).where(Artifact.study_pk == study.id).order_by(Artifact.id)).all()
    deliveries: dict[int, list[Delivery]] = {}
    if artifacts:
        for delivery in session.scalars(select(Delivery).where(Delivery.artifact_pk.in_([a.id for a in artifacts]))
                                        .order_by(Delivery.id)):
            deliveries.setdefault(delivery.artifact_pk, []).append(delivery)
    return [{
        "id": a.id,
        "kind": a.kind,
        "instance_id": a.instance_pk,
        "sop_class_uid": a.sop_class_uid,
        "sop_instance_uid": a.sop_instance_uid,
        "series_instance_uid": a.series_instance_uid,
        "available": _file_exists(a.file_path),
        "created_at": iso(a.created_at),
        "deliveries": [{"id": d.id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
                        "last_status": d.last_status, "last_error": d.last_error,
                        "next_attempt_at": iso(d.next_attempt_at), "delivered_at": iso(d.delivered_at)}
                       for d in deliveries.get(a.id, [])],
    } for a in artifacts]


def study_detail(session: Session, study: Study) -> dict[str, Any]:
    """A study with its instances (jobs, timelines, results) and its artifacts and deliveries."""
    detail = study_summary(session, study)
    pairs = _instances(session, study)
    instance_ids = [instance.id for instance, _ in pairs]
    jobs = _jobs(session, instance_ids)
    results = _latest_results(session, instance_ids)
    artifacts = _artifacts(session, study)
    instances = []
    for instance, series in pairs:
        job_list = jobs.get(instance.id, [])
        result = results.get(instance.id)
        instance_artifacts = {a["kind"]: a for a in artifacts if a["instance_id"] == instance.id and a["available"]}
        instances.append({
            "id": instance.id,
            "sop_instance_uid": instance.sop_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "version": instance.version,
            "changed_from_previous": instance.changed_from_previous,
            "instance_number": instance.instance_number,
            "series_instance_uid": series.series_instance_uid,
            "modality": series.modality,
            "body_part": series.body_part,
            "laterality": series.laterality,
            "size_bytes": instance.size_bytes,
            "sha256": instance.sha256,
            "source": instance.source,
            "original_filename": instance.original_filename,
            "received_at": iso(instance.received_at),
            "status": job_list[-1].state if job_list else "received",
            "job": job_dict(session, job_list[-1]) if job_list else None,
            "jobs": [job_dict(session, job) for job in job_list],
            "result": result_dict(result) if result is not None else None,
            "available": {
                "original": _file_exists(instance.file_path),
                "heatmap": result is not None and _file_exists(result.heatmap_path),
                "edges": result is not None and _file_exists(result.edges_path),
                "hybrid": result is not None and _file_exists(result.hybrid_path),
                "sc": "sc" in instance_artifacts,
            },
        })
    detail["instances"] = instances
    detail["artifacts"] = artifacts
    detail["available"] = {"sr": any(a["kind"] == "sr" and a["available"] for a in artifacts)}
    detail["disclaimer"] = DISCLAIMER
    return detail
