"""Study reporting: once a study is quiet and analysed, build its DICOM results and queue their deliveries.

A study is reported when it is ``pending``, no instance arrived for ``study_quiet_seconds``, every job of its
instances is terminal (done / rejected / failed) and at least one is done. The study is claimed with a
conditional UPDATE (``pending -> reporting``) so that concurrent workers report it once. Reporting writes,
under ``<artifact dir>/<Study Instance UID>/``,

- one Secondary Capture per analysed image (:mod:`dicom.sc`) that has no SC yet,
- one Grayscale Softcopy Presentation State per analysed image with a peak region (:mod:`dicom.gsps`) that
  has none yet, and
- one TID 1500 Structured Report (:mod:`dicom.sr`) listing every analysed image of the study,

records each as an :class:`~service.models.Artifact` and queues one :class:`~service.models.Delivery` per
(artifact, destination). The study becomes ``reported`` unless a new instance reset it to ``pending``
meanwhile, in which case it is reported again later: a new SR, new SCs for the new images only, and
deliveries for the new artifacts only. A study whose objects cannot be built becomes ``report_failed``
(logged with the reason); a new instance makes it ``pending`` again.

The SC, GSPS and SR series UIDs are derived from the study and the device UID, so every report of a study by the
same FractureNode and models lands in the same three series.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from config import Settings
from dicom.gsps import build_presentation_state
from dicom.sc import build_secondary_capture
from dicom.sr import DeviceIdentity, ImageFindings, build_structured_report
from pipeline.types import ModelIdentity
from service.db import Database
from service.models import AnalysisResult, Artifact, Delivery, Instance, Job, Series, Study, utcnow

log = logging.getLogger(__name__)

TERMINAL_JOB_STATES = ("done", "rejected", "failed")
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
GSPS_SERIES_NUMBER = 9903


@dataclass(frozen=True)
class _Analysed:
    instance_pk: int
    source_path: Path
    result: AnalysisResult


def _quiet_candidates(session: Session, settings: Settings) -> list[int]:
    cutoff = utcnow() - dt.timedelta(seconds=settings.study_quiet_seconds)
    not_terminal = func.sum(case((Job.state.in_(TERMINAL_JOB_STATES), 0), else_=1))
    done = func.sum(case((Job.state == "done", 1), else_=0))
    query = (select(Study.id)
             .join(Series, Series.study_pk == Study.id).join(Instance, Instance.series_pk == Series.id)
             .join(Job, Job.instance_pk == Instance.id)
             .where(Study.report_state == "pending", Study.last_instance_at <= cutoff)
             .group_by(Study.id).having(not_terminal == 0).having(done >= 1).order_by(Study.id))
    return list(session.scalars(query))


def _claim(db: Database, study_id: int) -> bool:
    with db.session() as session:
        result = session.execute(update(Study).where(Study.id == study_id, Study.report_state == "pending")
                                 .values(report_state="reporting").execution_options(synchronize_session=False))
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _analysed_instances(session: Session, study_id: int) -> list[_Analysed]:
    """The newest radiograph result of each instance of the study (newest version of each SOP instance)."""
    rows = session.execute(
        select(Instance, AnalysisResult)
        .join(Series, Series.id == Instance.series_pk)
        .join(AnalysisResult, AnalysisResult.instance_pk == Instance.id)
        .where(Series.study_pk == study_id)
        .order_by(Instance.sop_instance_uid, Instance.version.desc(), AnalysisResult.id.desc())).all()
    chosen: dict[str, _Analysed | None] = {}
    for instance, result in rows:
        if instance.sop_instance_uid in chosen:
            continue
        if not result.is_radiograph or result.fracture_probability is None or result.detection_call is None:
            chosen[instance.sop_instance_uid] = None  # the newest result is not reportable
            continue
        chosen[instance.sop_instance_uid] = _Analysed(instance.id, Path(instance.file_path), result)
    return sorted((a for a in chosen.values() if a is not None), key=lambda a: a.instance_pk)


def findings_from_result(result: AnalysisResult) -> ImageFindings:
    """Map an :class:`AnalysisResult` row onto the builders' plain findings."""
    models = list(result.models or [])
    name = result.model_name or (models[0]["name"] if models else "unknown")
    version = result.model_version or (models[0]["version"] if models else "unknown")
    return ImageFindings.from_values(
        fracture_probability=float(result.fracture_probability or 0.0), detection_call=str(result.detection_call),
        model_name=name, model_version=version, models=models, operating_point=result.operating_point,
        top_type=result.top_type, top_type_probability=result.top_type_probability,
        type_distribution={str(k): float(v) for k, v in (result.type_distribution or {}).items()},
        peak_box=result.peak_box or None,
    )


def device_identity(findings: list[ImageFindings]) -> DeviceIdentity:
    models: dict[tuple[str, str, str], ModelIdentity] = {}
    for f in findings:
        for m in f.models or (f.algorithm,):
            models.setdefault((m.name, m.version, m.sha256), m)
    return DeviceIdentity(models=tuple(models.values()))


def _destinations(settings: Settings, study: Study) -> list[str]:
    """Where the study's results go.

    Only studies that arrived over the DICOM network are sent back: an HTTP upload has no study in the PACS
    (a PNG gets a new Study Instance UID), so its results stay in the portal and API. By default every
    configured destination receives them; with ``return_to_sender`` only the destination whose AE title is
    the study's calling AE does (all destinations when the sender is not one of them).
    """
    if study.source != "dicom":
        return []
    targets = [str(d) for d in settings.destinations]
    if settings.return_to_sender and study.calling_ae:
        sender = [str(d) for d in settings.destinations if d.ae_title == study.calling_ae]
        if sender:
            return sender
        log.warning("study %s: calling AE %r is not among the destinations; sending to all of them",
                    study.study_instance_uid, study.calling_ae)
    return list(dict.fromkeys(targets))


def _write(ds: Dataset, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_rgb(path: str) -> np.ndarray:
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read overlay image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def report_study(db: Database, settings: Settings, study_id: int) -> list[int]:
    """Build and record a claimed study's objects and deliveries; return the new artifact ids."""
    with db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None
        analysed = _analysed_instances(session, study_id)
        existing = {(kind, pk) for kind, pk in session.execute(
            select(Artifact.kind, Artifact.instance_pk).where(Artifact.study_pk == study_id))}
        counts: dict[str, int] = {str(kind): int(n) for kind, n in session.execute(
            select(Artifact.kind, func.count()).where(Artifact.study_pk == study_id).group_by(Artifact.kind))}
        study_uid = study.study_instance_uid
        destinations = _destinations(settings, study)
    if not analysed:
        return []
    sources: list[tuple[_Analysed, Dataset, ImageFindings]] = []
    for item in analysed:
        # Header only: the builders need the source's identity and geometry, never its pixels (a study of many
        # large images would otherwise be held in memory whole).
        sources.append((item, dcmread(item.source_path, stop_before_pixels=True), findings_from_result(item.result)))
    device = device_identity([f for _, _, f in sources])
    sc_series = str(generate_uid(entropy_srcs=[study_uid, "fracturenode-sc", device.uid]))
    sr_series = str(generate_uid(entropy_srcs=[study_uid, "fracturenode-sr", device.uid]))
    gsps_series = str(generate_uid(entropy_srcs=[study_uid, "fracturenode-gsps", device.uid]))
    out_dir = settings.artifact_dir / study_uid
    new: list[Artifact] = []
    sc_number = counts.get("sc", 0)
    for item, source, findings in sources:
        if ("sc", item.instance_pk) in existing or not item.result.hybrid_path:
            continue
        sc_number += 1
        uid = str(generate_uid())
        sc = build_secondary_capture(source, _read_rgb(item.result.hybrid_path), findings, device,
                                     series_instance_uid=sc_series, series_number=SC_SERIES_NUMBER,
                                     sop_instance_uid=uid, instance_number=sc_number)
        path = out_dir / f"sc-{uid}.dcm"
        new.append(Artifact(study_pk=study_id, instance_pk=item.instance_pk, kind="sc", sop_class_uid=sc.SOPClassUID,
                            sop_instance_uid=uid, series_instance_uid=sc_series, file_path=str(path),
                            sha256=_write(sc, path)))
    gsps_number = counts.get("gsps", 0)
    for item, source, findings in sources:
        if ("gsps", item.instance_pk) in existing or findings.peak_box is None \
                or int(source.get("SamplesPerPixel", 1)) != 1:
            continue
        gsps_number += 1
        uid = str(generate_uid())
        gsps = build_presentation_state(source, findings, device, series_instance_uid=gsps_series,
                                        series_number=GSPS_SERIES_NUMBER, sop_instance_uid=uid,
                                        instance_number=gsps_number)
        path = out_dir / f"gsps-{uid}.dcm"
        new.append(Artifact(study_pk=study_id, instance_pk=item.instance_pk, kind="gsps",
                            sop_class_uid=gsps.SOPClassUID, sop_instance_uid=uid, series_instance_uid=gsps_series,
                            file_path=str(path), sha256=_write(gsps, path)))
    uid = str(generate_uid())
    sr = build_structured_report([(source, findings) for _, source, findings in sources], device,
                                 series_instance_uid=sr_series, series_number=SR_SERIES_NUMBER,
                                 sop_instance_uid=uid, instance_number=counts.get("sr", 0) + 1)
    path = out_dir / f"sr-{uid}.dcm"
    new.append(Artifact(study_pk=study_id, instance_pk=None, kind="sr", sop_class_uid=sr.SOPClassUID,
                        sop_instance_uid=uid, series_instance_uid=sr_series, file_path=str(path),
                        sha256=_write(sr, path)))
    with db.session() as session:
        session.add_all(new)
        session.flush()
        now = utcnow()
        session.add_all(Delivery(artifact_pk=a.id, destination=dest, state="pending", next_attempt_at=now,
                                 created_at=now) for a in new for dest in destinations)
    log.info("study %s: %d objects, %d deliveries queued", study_uid, len(new), len(new) * len(destinations))
    return [a.id for a in new]


def report_quiet_studies(db: Database, settings: Settings) -> int:
    """Report every quiet, fully analysed study; return how many were reported."""
    with db.session() as session:
        candidates = _quiet_candidates(session, settings)
    reported = 0
    for study_id in candidates:
        if not _claim(db, study_id):
            continue  # another worker took it
        try:
            report_study(db, settings, study_id)
        except Exception:
            log.exception("could not report study %s", study_id)
            with db.session() as session:
                session.execute(update(Study).where(Study.id == study_id, Study.report_state == "reporting")
                                .values(report_state="report_failed").execution_options(synchronize_session=False))
            continue
        with db.session() as session:
            session.execute(update(Study).where(Study.id == study_id, Study.report_state == "reporting")
                            .values(report_state="reported", reported_at=utcnow())
                            .execution_options(synchronize_session=False))
        reported += 1
    return reported
