"""Job workers: ``fracture-node work``.

Each worker loads the models once, then loops: claim up to ``batch_size`` jobs with a lease
(:func:`service.jobs.claim_jobs`), renew the leases from a heartbeat thread while working, and for each job

1. read the stored file and check its SHA-256;
2. :func:`dicom.image.check_radiograph_header` (wrong modality, SOP class...) -> ``rejected`` with the reason;
3. :func:`dicom.image.radiograph_from_dataset` (unsupported or corrupt pixel data) -> ``rejected``;
4. :func:`pipeline.run.analyze_batch` over the batch; a "not a radiograph" verdict -> ``rejected``;
5. heatmap/edges/hybrid PNGs under ``<artifact dir>/<Study UID>/<SOP Instance UID>/``, then the
   :class:`~service.models.AnalysisResult` and the job's terminal state in ONE transaction that is
   conditional on still holding the lease (exactly one result per job even when a lease expired).

Anything else (database or file errors, an unexpected exception) is transient: the job goes back to the
queue with exponential backoff, and is ``failed`` with the error text after ``job_max_attempts``. After
each round the worker reports quiet studies and delivers due objects. SIGTERM/SIGINT: no new claims; the
batch in hand is finished (or its unprocessed jobs released) and the worker exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click
import cv2
import numpy as np
from sqlalchemy.exc import DBAPIError

from config import Settings
from service import jobs
from service.db import Database
from service.jobs import Claim
from service.malloc import release_memory, tune_malloc
from service.models import AnalysisResult, Instance, Series, Study
from service.storage import sha256_bytes, write_atomic

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4
DEFAULT_POLL_SECONDS = 0.5
DEFAULT_RETRY_BASE_SECONDS = 2.0


class _LeaseLost(Exception):
    pass


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Item:
    """One claimed job on its way through the batch."""

    claim: Claim
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    version: int = 1
    radiograph: Any = None
    outcome: str | None = None  # set once the job has been finished
    artifacts: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- results


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def write_explanations(settings: Settings, item: _Item, explanation: Any) -> dict[str, str]:
    """heatmap.png (colour-mapped), edges.png, hybrid.png under the instance's artifact folder."""
    from pipeline.explain import heatmap_bgr

    folder = settings.artifact_dir / item.study_instance_uid / item.sop_instance_uid
    if item.version > 1:
        folder = folder / f"v{item.version}"
    def hybrid_bgr() -> np.ndarray:
        hybrid = np.asarray(explanation.hybrid, dtype=np.uint8)
        return cv2.cvtColor(hybrid, cv2.COLOR_RGB2BGR) if hybrid.ndim == 3 else hybrid

    # One image at a time (each made, encoded, written and dropped before the next): a smaller peak.
    images = {
        "heatmap": lambda: heatmap_bgr(np.asarray(explanation.heatmap, dtype=np.float32)),
        "edges": lambda: np.asarray(explanation.edges, dtype=np.uint8),
        "hybrid": hybrid_bgr,
    }
    paths = {}
    for name, make in images.items():
        path = folder / f"{name}.png"
        write_atomic(path, _png(make()))
        paths[name] = str(path)
    return paths


def _model_dicts(identities: Sequence[Any]) -> list[dict[str, str]]:
    return [{"name": m.name, "version": m.version, "sha256": m.sha256, "task": m.task} for m in identities]


def _result_from_analysis(item: _Item, analysis: Any) -> AnalysisResult:
    detection, classification = analysis.detection, analysis.classification
    explanation = analysis.explanation
    primary = detection.model if detection is not None else analysis.validity.model
    return AnalysisResult(
        instance_pk=item.claim.instance_pk, job_pk=item.claim.job_id,
        is_radiograph=analysis.validity.is_radiograph, validity_score=float(analysis.validity.score),
        validity_reason=analysis.validity.reason,
        fracture_probability=float(detection.probability) if detection else None,
        operating_point=float(detection.operating_point) if detection else None,
        detection_call=detection.call if detection else None,
        top_type=classification.top_type if classification else None,
        top_type_probability=float(classification.top_probability) if classification else None,
        type_distribution=dict(classification.distribution) if classification else None,
        peak_box=explanation.peak_box.as_list() if explanation is not None and explanation.peak_box else None,
        pixel_spacing_mm=list(item.radiograph.pixel_spacing_mm) if item.radiograph.pixel_spacing_mm else None,
        models=_model_dicts(analysis.models),
        model_name=primary.name if primary else None, model_version=primary.version if primary else None,
        heatmap_path=item.artifacts.get("heatmap"), edges_path=item.artifacts.get("edges"),
        hybrid_path=item.artifacts.get("hybrid"),
    )


def _rejection_result(item: _Item, reason: str) -> AnalysisResult:
    return AnalysisResult(instance_pk=item.claim.instance_pk, job_pk=item.claim.job_id, is_radiograph=False,
                          validity_score=0.0, validity_reason=reason, models=[])


def _finish(db: Database, item: _Item, state: str, result: AnalysisResult | None, *, reason: str | None = None,
            error: str | None = None) -> None:
    """Terminal state + result in one transaction, only while we hold the lease."""
    try:
        with db.session() as session:
            if not jobs.finish(session, item.claim, state, reason=reason, error=error):
                raise _LeaseLost
            if result is not None:
                session.add(result)
    except _LeaseLost:
        item.outcome = "lost"
        log.warning("job %s (%s): lease lost to another worker; result discarded", item.claim.job_id,
                    item.sop_instance_uid)
        return
    item.outcome = state
    detail = reason or error or ""
    log.info("job %s (%s v%d): %s%s", item.claim.job_id, item.sop_instance_uid, item.version, state,
             f": {detail}" if detail else "")


def _transient(db: Database, item: _Item, exc: BaseException, retry_base: float) -> None:
    error = f"{type(exc).__name__}: {exc}"
    outcome = jobs.retry_later(db, item.claim, error[:2000], base_delay=retry_base)
    item.outcome = outcome
    log.warning("job %s (%s): %s after attempt %d/%d: %s", item.claim.job_id, item.sop_instance_uid, outcome,
                item.claim.attempt, item.claim.max_attempts, error)
    log.debug("%s", "".join(traceback.format_exception(exc)))


# ---------------------------------------------------------------------------------------------- batch


def _prepare(db: Database, item: _Item) -> None:
    """Read, verify and decode one job's instance; rejects it if validation refuses it."""
    from dicom.image import ImageDecodeError, check_radiograph_header, radiograph_from_dataset, read_dataset

    with db.session() as session:
        instance = session.get(Instance, item.claim.instance_pk)
        if instance is None:
            raise LookupError(f"instance {item.claim.instance_pk} of job {item.claim.job_id} is gone")
        series = session.get(Series, instance.series_pk)
        study = session.get(Study, series.study_pk) if series is not None else None
        item.sop_instance_uid, item.version = instance.sop_instance_uid, instance.version
        item.study_instance_uid = study.study_instance_uid if study is not None else "unknown-study"
        path, expected = Path(instance.file_path), instance.sha256
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        _finish(db, item, jobs.FAILED, None, error=f"stored file {path.name} does not match its SHA-256 "
                                                   f"(expected {expected[:16]}, found {actual[:16]})")
        return
    try:
        ds = read_dataset(data)
        reason = check_radiograph_header(ds)
        if reason is None:
            item.radiograph = radiograph_from_dataset(ds)
    except ImageDecodeError as exc:
        reason = str(exc)
    if reason is not None:
        _finish(db, item, jobs.REJECTED, _rejection_result(item, reason), reason=reason)


def _complete(db: Database, settings: Settings, item: _Item, analysis: Any) -> None:
    if not analysis.validity.is_radiograph:
        reason = analysis.validity.reason
        _finish(db, item, jobs.REJECTED, _result_from_analysis(item, analysis), reason=reason)
        return
    if analysis.explanation is not None:
        item.artifacts = write_explanations(settings, item, analysis.explanation)
    summary = analysis.detection.call if analysis.detection is not None else "analysed"
    if analysis.classification is not None:
        summary += f" ({analysis.classification.top_type})"
    _finish(db, item, jobs.DONE, _result_from_analysis(item, analysis), reason=summary)


def process_batch(db: Database, settings: Settings, claims: Sequence[Claim], models: Any, *,
                  retry_base: float = DEFAULT_RETRY_BASE_SECONDS, stop: threading.Event | None = None) -> list[str]:
    """Process claimed jobs; returns each job's outcome (done, rejected, failed, queued, lost, released).

    One image at a time: read and decode, analyse, write the explanation PNGs and the result, then let go of
    the pixels and the explanation images before the next one, so that the worker's peak memory is one image's
    worth whatever the batch size (the claim, the lease heartbeat and the database round trips stay batched).
    """
    from pipeline.run import analyze_batch

    items = [_Item(claim) for claim in claims]
    for item in items:
        if stop is not None and stop.is_set():
            break
        try:
            _prepare(db, item)
        except Exception as exc:  # noqa: BLE001 - transient: retried with backoff, then failed
            _transient(db, item, exc, retry_base)
        if item.outcome is None and item.radiograph is not None:
            _analyse_one(db, settings, item, models, analyze_batch, retry_base)
        item.radiograph = None
        release_memory()
    leftover = [item.claim for item in items if item.outcome is None]
    if leftover:
        jobs.release(db, leftover)
        for item in items:
            if item.outcome is None:
                item.outcome = "released"
    return [item.outcome or "released" for item in items]


def _analyse_one(db: Database, settings: Settings, item: _Item, models: Any, analyze_batch: Any,
                 retry_base: float) -> None:
    try:
        (analysis,) = analyze_batch([item.radiograph], models)
    except Exception as exc:  # noqa: BLE001
        _transient(db, item, exc, retry_base)
        return
    try:
        _complete(db, settings, item, analysis)
    except Exception as exc:  # noqa: BLE001
        _transient(db, item, exc, retry_base)


@contextmanager
def _heartbeat(db: Database, claims: Sequence[Claim], lease_seconds: float) -> Iterator[None]:
    """Renew the leases every third of the lease while the batch is being processed."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(max(lease_seconds / 3.0, 0.2)):
            try:
                jobs.renew_leases(db, claims, lease_seconds)
            except Exception as exc:  # noqa: BLE001 - the lease may lapse; completion checks it
                log.warning("could not renew leases: %s", exc)

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


DB_OUTAGE_MAX_WAIT = 30.0


def _followups(db: Database, settings: Settings, owner: str) -> None:
    """Study reporting and delivery, run after each round of jobs."""
    from service.delivery import deliver_due
    from service.reporting import report_quiet_studies

    for name, call in (("report_quiet_studies", lambda: report_quiet_studies(db, settings)),
                       ("deliver_due", lambda: deliver_due(db, settings, owner))):
        try:
            call()
        except DBAPIError:
            raise  # the database is gone: the loop backs off as a whole
        except Exception:
            log.exception("%s failed", name)


def run_worker(settings: Settings, stop: threading.Event, *, db: Database | None = None, models: Any = None,
               batch_size: int = DEFAULT_BATCH_SIZE, poll_interval: float = DEFAULT_POLL_SECONDS,
               max_jobs: int | None = None, exit_when_idle: bool = False, owner: str | None = None,
               retry_base: float = DEFAULT_RETRY_BASE_SECONDS) -> int:
    """The worker loop; returns how many jobs it processed. Stops when ``stop`` is set (or ``max_jobs``)."""
    from pipeline.run import load_models

    owner = owner or worker_id()
    database = db if db is not None else Database.from_settings(settings)
    if models is None:
        models = load_models(settings.model_dir, runtime=settings.model_runtime, mirror=settings.mirror_look)
        release_memory()  # what building the networks (and the onnx runtime's graphs) left in the heap
        log.info("worker %s loaded models %s", owner, ", ".join(m.label for m in models.identities))
    processed = 0
    outage: float | None = None  # current back-off while the database is unreachable
    try:
        while not stop.is_set():
            limit = batch_size if max_jobs is None else min(batch_size, max_jobs - processed)
            try:
                claims = jobs.claim_jobs(database, owner, limit=limit, lease_seconds=settings.job_lease_seconds)
                if claims:
                    with _heartbeat(database, claims, settings.job_lease_seconds):
                        process_batch(database, settings, claims, models, retry_base=retry_base, stop=stop)
                    processed += len(claims)
                _followups(database, settings, owner)
            except DBAPIError as exc:
                # The database is unreachable (restart, failover, network): jobs in hand keep their leases
                # and are taken up again when they expire, so nothing is lost; wait and try again.
                outage = min(DB_OUTAGE_MAX_WAIT, (outage or 0.5) * 2)
                log.warning("database unavailable (%s); retrying in %.0f s", str(exc).splitlines()[0], outage)
                stop.wait(outage)
                continue
            if outage is not None:
                log.info("database reachable again")
                outage = None
            if max_jobs is not None and processed >= max_jobs:
                break
            if not claims:
                if exit_when_idle:
                    break
                stop.wait(poll_interval)
    finally:
        if db is None:
            database.dispose()
    log.info("worker %s stopping after %d jobs", owner, processed)
    return processed


@click.command()
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Jobs claimed and analysed together.")
@click.option("--poll-interval", type=float, default=DEFAULT_POLL_SECONDS, show_default=True,
              help="Seconds between polls of an empty queue.")
@click.option("--max-jobs", type=int, default=None, help="Exit after this many jobs.")
@click.option("--exit-when-idle", is_flag=True, help="Exit once the queue is empty.")
def work(batch_size: int, poll_interval: float, max_jobs: int | None, exit_when_idle: bool) -> None:
    """Run a job worker (any number may share the database). SIGTERM finishes the batch in hand, then exits."""
    from pipeline.models.bundle import BundleError
    from service.cli import configure_logging, load_settings, migrate_in_child

    settings = load_settings()
    configure_logging(settings.log_level)
    migrate_in_child()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing the jobs in hand, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tune_malloc()
    try:
        run_worker(settings, stop, batch_size=batch_size, poll_interval=poll_interval, max_jobs=max_jobs,
                   exit_when_idle=exit_when_idle)
    except BundleError as exc:
        log.error("cannot load the models: %s", exc)
        sys.exit(2)
